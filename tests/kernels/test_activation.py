"""silu_and_mul (Triton) against the plain-torch reference."""
import pytest
import torch

from tests.kernels.kernel_testing import assert_close, device, poisoned_allocations
from tandem.kernels.activation import silu_and_mul, silu_and_mul_ref

# Same roundings as torch's two eager ops; only exp() may differ in the last bit.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


@pytest.mark.parametrize(
    "shape, dtype",
    [((4, 64), torch.float32), ((2, 3, 40), torch.float16), ((1, 2), torch.float32), ((3, 2100), torch.float32)],
)
def test_silu_and_mul_matches_ref(shape, dtype):
    x = (torch.randn(shape, device=device()) * 4).to(dtype)
    with poisoned_allocations():
        out = silu_and_mul(x)
    assert_close(out, silu_and_mul_ref(x), TOL[dtype])


def test_empty_rows():
    assert silu_and_mul(torch.randn(0, 16, device=device())).shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_and_mul_llama3_8b_gpu(num_tokens, dtype):
    x = (torch.randn(num_tokens, 2 * 14336, device="cuda") * 4).to(dtype)
    with poisoned_allocations():
        out = silu_and_mul(x)
    assert_close(out, silu_and_mul_ref(x), TOL[dtype])
