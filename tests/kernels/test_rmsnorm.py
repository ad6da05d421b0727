"""rms_norm / fused_add_rms_norm (Triton) against the plain-torch reference."""
import pytest
import torch

from tests.kernels.kernel_testing import assert_close, device, poisoned_allocations
from tandem.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

# The kernel rounds where the reference does, so only the fp32 sum-of-squares order differs.
ELEMENTWISE_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def inputs(shape, dtype, weight_dtype=None):
    dev = device()
    x = torch.randn(shape, device=dev).to(dtype) * 3
    residual = torch.randn(shape, device=dev).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=dev)).to(weight_dtype or dtype)
    return x, residual, weight


@pytest.mark.parametrize(
    "shape, dtype, weight_dtype",
    [
        ((5, 64), torch.float32, None),
        ((2, 3, 48), torch.float16, None),  # 3-d input, non power-of-2 hidden
        ((1, 40), torch.float16, torch.float32),  # fp32 weight promotes the output
        ((0, 32), torch.float32, None),
    ],
)
def test_rms_norm_matches_ref(shape, dtype, weight_dtype):
    x, residual, weight = inputs(shape, dtype, weight_dtype)
    with poisoned_allocations():
        out = rms_norm(x, weight, 1e-6)
        normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    ref_out = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == ref_out.dtype and normed.dtype == ref_normed.dtype
    if x.numel():
        assert_close(out, ref_out, ELEMENTWISE_TOL[dtype])
        assert_close(normed, ref_normed, ELEMENTWISE_TOL[dtype])
        assert torch.equal(summed, ref_summed)


def test_fused_add_leaves_inputs_untouched():
    x, residual, weight = inputs((3, 32), torch.float32)
    x0, r0 = x.clone(), residual.clone()
    fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(x, x0) and torch.equal(residual, r0)


def test_strided_rows():
    x, _, weight = inputs((4, 64), torch.float32)
    view = x[:, :32]  # row stride 64
    assert_close(rms_norm(view, weight[:32], 1e-6), rms_norm_ref(view, weight[:32], 1e-6), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_llama3_8b_gpu(num_tokens, dtype):
    x, residual, weight = inputs((num_tokens, 4096), dtype)
    with poisoned_allocations():
        out = rms_norm(x, weight, 1e-5)
        normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_close(out, rms_norm_ref(x, weight, 1e-5), ELEMENTWISE_TOL[dtype])
    assert_close(normed, ref_normed, ELEMENTWISE_TOL[dtype])
    assert torch.equal(summed, ref_summed)
