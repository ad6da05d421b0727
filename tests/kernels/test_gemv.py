"""The skinny GEMV (kernels/gemv.py, Triton) against F.linear, and ops.linear's choice of path."""
import pytest
import torch

from tandem.kernels import ops
from tandem.kernels.gemv import gemv, gemv_ref
from tests.kernels.kernel_testing import TOLERANCE, assert_close, device, poisoned_allocations


@pytest.mark.parametrize("n, k", [(48, 64), (100, 96), (64, 300), (8, 2048)])
@pytest.mark.parametrize("silu_mul_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_ref(n, k, silu_mul_input, dtype):
    x = torch.randn(1, 2 * k if silu_mul_input else k, device=device()).to(dtype)
    w = (torch.randn(n, k, device=device()) / k**0.5).to(dtype)
    with poisoned_allocations():
        y = gemv(x, w, silu_mul_input)
    assert y.shape == (1, n) and y.dtype == dtype
    assert_close(y, gemv_ref(x.float(), w.float(), silu_mul_input), TOLERANCE[dtype])


@pytest.mark.parametrize("tiles", [(4, 32, 4), (16, 16, 4), (32, 64, 8)])
def test_gemv_tiles_that_do_not_divide_the_shape(tiles):
    x, w = torch.randn(1, 200, device=device()), torch.randn(70, 200, device=device())
    assert_close(gemv(x, w, tiles=tiles), gemv_ref(x, w), TOLERANCE[torch.float32])


def test_gemv_rejects_what_it_cannot_do():
    w = torch.randn(8, 16, device=device())
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16, device=device()), w)
    with pytest.raises(ValueError, match="columns"):
        gemv(torch.randn(1, 12, device=device()), w)
    with pytest.raises(ValueError, match="row-major"):
        gemv(torch.randn(1, 16, device=device()), w.t().contiguous().t())


def test_ops_linear_takes_the_skinny_path_only_where_it_applies(monkeypatch):
    """One row + row-major + no bias -> gemv; more rows, a bias or a transposed weight -> F.linear.
    Both give the layer's function (SiLU-and-mul fused or not)."""
    monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
    calls = []
    real = ops.gemv_mod.gemv
    monkeypatch.setattr(ops.gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    layer = torch.nn.Linear(32, 24, bias=False)
    biased = torch.nn.Linear(32, 24, bias=True)
    col_major = torch.nn.Linear(32, 24, bias=False)
    col_major.weight.data = col_major.weight.data.t().contiguous().t()
    for rows, lin, skinny in [(1, layer, True), (2, layer, False), (1, biased, False), (1, col_major, False)]:
        calls.clear()
        x = torch.randn(rows, 32)
        assert_close(ops.linear(x, lin), lin(x).detach(), TOLERANCE[torch.float32])
        assert calls == ([rows] if skinny else [])
        x2 = torch.randn(rows, 64)
        ref = lin(torch.nn.functional.silu(x2[:, :32]) * x2[:, 32:]).detach()
        assert_close(ops.linear(x2, lin, silu_mul_input=True), ref, TOLERANCE[torch.float32])
    monkeypatch.setenv("TANDEM_SKINNY_GEMV", "0")
    calls.clear()
    ops.linear(torch.randn(1, 32), layer)
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, silu", [(6144, 4096, False), (4096, 4096, False), (28672, 4096, False),
                                        (4096, 14336, True), (128256, 4096, False)])
def test_gemv_llama3_8b_shapes_bf16_gpu(n, k, silu):
    x = torch.randn(1, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    with poisoned_allocations():
        y = gemv(x, w, silu)
    assert_close(y, gemv_ref(x.float(), w.float(), silu), TOLERANCE[torch.bfloat16])
