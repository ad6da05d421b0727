"""FP8 (e4m3) weights: quantizers and their layouts, the batch-1 GEMV's FP8 variant (Triton, in
the interpreter on a CPU) and the fused MoE kernel's, each against the dequantize-then-matmul
reference; `torch._scaled_mm` against the same reference (GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import ops
from tandem.kernels.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_weight, fake_quantize_input, fp8_linear_ref,
                                fp8_linear_scaled_mm, quantize_blocks, quantize_rows, scaled_mm_supported)
from tandem.kernels.fused_moe import MoeFp8Scales, fused_moe, fused_moe_ref
from tandem.kernels.gemv import gemv, gemv_ref
from tests.kernels.kernel_testing import TOLERANCE, assert_close, device, poisoned_allocations

# e4m3 keeps 3 mantissa bits: a value rounds to within 2^-4 of itself (relative), below the
# subnormal range (|x| < 2^-6 of the row's scale) within half the smallest step, 2^-10.
E4M3_REL = 2.0**-4


def quantized_weight(n: int, k: int, group_k: int = 0, dev=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    w = torch.randn(n, k, device=dev or device()) / k**0.5
    if group_k:
        q, grid = quantize_blocks(w, (group_k, group_k))
        scale = grid.repeat_interleave(group_k, dim=0)[:n].contiguous()
        return q, scale, group_k
    q, scale = quantize_rows(w)
    return q, scale, k


def test_quantize_rows_round_trip_is_within_e4m3_rounding():
    x = torch.randn(16, 256) * torch.logspace(-3, 3, 16)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (16, 1)
    assert (q.float().abs().amax(dim=1) == FP8_MAX).all()  # each row's largest value maps to 448
    err = (q.float() * scale - x).abs()
    assert (err <= E4M3_REL * x.abs() + 2.0**-9 * scale).all()
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 8))
    assert torch.isfinite(zero_scale).all() and (zero_q.float() == 0).all()


def test_block_layout_dequantizes_tile_by_tile():
    """quantize_blocks' [ceil(N/bn), ceil(K/bk)] grid, expanded to rows, is what dequantize_weight
    reads; shapes that are not multiples of the block keep their partial tiles."""
    w = torch.randn(40, 70)
    w[:16, :32] *= 100  # one loud tile must not coarsen its neighbours
    q, grid = quantize_blocks(w, (16, 32))
    assert q.shape == w.shape and grid.shape == (3, 3)
    scale = grid.repeat_interleave(16, dim=0)[:40]
    back = dequantize_weight(q, scale, 32)
    assert ((back - w).abs() <= E4M3_REL * w.abs() + 2.0**-9 * scale.repeat_interleave(32, dim=1)[:, :70]).all()
    assert (grid[0, 0] / grid[1, 1]) > 20


def test_reference_with_input_quantization_rounds_activations():
    q, scale, gk = quantized_weight(24, 64, dev="cpu")
    x = torch.randn(5, 64)
    exact = fp8_linear_ref(x, q, scale, gk)
    assert torch.equal(exact, F.linear(x, dequantize_weight(q, scale, gk)))
    emulated = fp8_linear_ref(x, q, scale, gk, quantize_input=True)
    # as torch._scaled_mm gives it: a bfloat16 output
    assert torch.equal(emulated, F.linear(fake_quantize_input(x, None), dequantize_weight(q, scale, gk))
                       .to(torch.bfloat16).float())
    assert not torch.equal(emulated, exact)
    static = x.abs().max() / FP8_MAX
    assert torch.equal(fp8_linear_ref(x, q, scale, gk, input_scale=static, quantize_input=True),
                       F.linear(fake_quantize_input(x, static), dequantize_weight(q, scale, gk)).to(torch.bfloat16).float())


@pytest.mark.parametrize("n, k, group_k", [(48, 64, 0), (100, 96, 0), (64, 300, 0), (70, 256, 32), (40, 200, 64)])
@pytest.mark.parametrize("silu_mul_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_gemv_matches_ref(n, k, group_k, silu_mul_input, dtype):
    q, scale, gk = quantized_weight(n, k, group_k)
    x = torch.randn(1, 2 * k if silu_mul_input else k, device=device()).to(dtype)
    with poisoned_allocations():
        y = gemv(x, q, silu_mul_input, weight_scale=scale, group_k=gk)
    assert y.shape == (1, n) and y.dtype == dtype
    ref = gemv_ref(x.float(), q, silu_mul_input, weight_scale=scale, group_k=gk)
    assert_close(y, ref, TOLERANCE[dtype])


def test_fp8_gemv_rejects_bad_scales():
    q, scale, gk = quantized_weight(8, 64)
    x = torch.randn(1, 64, device=device())
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(x, q, weight_scale=scale[:4], group_k=gk)
    with pytest.raises(ValueError, match="scale groups"):
        gemv(x, q, weight_scale=torch.ones(8, 3, device=device()), group_k=16)


class _Layer(torch.nn.Module):
    """The attributes ops.linear reads from an FP8 layer (engine/fp8.Fp8Linear has them)."""

    def __init__(self, n, k, group_k=0, bias=False):
        super().__init__()
        self.weight, self.weight_scale, self.group_k = quantized_weight(n, k, group_k)
        self.bias = torch.randn(n, device=device()) if bias else None
        self.input_scale = None
        self.quantize_input = False


def test_ops_linear_on_fp8_layers(monkeypatch):
    """One row -> the FP8 GEMV (Triton under TANDEM_TRITON_ON_CPU); more rows, or a bias -> the
    Triton GEMM that dequantizes in registers. All give dequantize-then-matmul."""
    monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
    calls = []
    real = ops.gemv_mod.gemv
    monkeypatch.setattr(ops.gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for rows, layer, skinny in [(1, _Layer(24, 32), True), (3, _Layer(24, 32), False),
                                (1, _Layer(24, 64, group_k=16), True), (1, _Layer(24, 32, bias=True), False)]:
        calls.clear()
        x = torch.randn(rows, 64, device=device())
        ref = F.linear(F.silu(x[:, :32]) * x[:, 32:] if layer.weight.shape[1] == 32 else x,
                       dequantize_weight(layer.weight, layer.weight_scale, layer.group_k), layer.bias)
        out = ops.linear(x, layer, silu_mul_input=layer.weight.shape[1] == 32)
        assert_close(out, ref, TOLERANCE[torch.float32])
        assert calls == ([rows] if skinny else [])


def fp8_experts(num_experts, hidden, inter, group_k=0, dev=None):
    q1, s1 = [], []
    q2, s2 = [], []
    for _ in range(num_experts):
        q, s, _ = quantized_weight(2 * inter, hidden, group_k, dev=dev)
        q1.append(q), s1.append(s)
        q, s, _ = quantized_weight(hidden, inter, group_k, dev=dev)
        q2.append(q), s2.append(s)
    scales = MoeFp8Scales(torch.stack(s1), torch.stack(s2), group_k or hidden, group_k or inter)
    return torch.stack(q1), torch.stack(q2), scales


@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, inter, group_k, dtype", [
    (1, 4, 1, 32, 16, 0, torch.float32),
    (37, 8, 2, 64, 32, 0, torch.float32),
    (20, 8, 4, 64, 48, 16, torch.float16),  # per-block scales, inter not a multiple of the tile
])
def test_fused_moe_fp8_matches_ref(num_tokens, num_experts, top_k, hidden, inter, group_k, dtype):
    w13, w2, scales = fp8_experts(num_experts, hidden, inter, group_k)
    x = torch.randn(num_tokens, hidden, device=device()).to(dtype)
    weights, ids = torch.topk(torch.softmax(torch.randn(num_tokens, num_experts, device=device()), -1), top_k, -1)
    with poisoned_allocations():
        out = fused_moe(x, w13, w2, weights, ids, scales=scales)
    ref = fused_moe_ref(x, w13, w2, weights, ids, scales=scales)
    assert out.dtype == dtype
    assert_close(out, ref, {torch.float32: 1e-5, torch.float16: 2e-3}[dtype])
    # The reference is the dequantized model's MoE, exactly.
    deq13 = dequantize_weight(w13, scales.gate_up, scales.gate_up_group_k).to(dtype)
    deq2 = dequantize_weight(w2, scales.down, scales.down_group_k).to(dtype)
    assert torch.equal(ref, fused_moe_ref(x, deq13, deq2, weights, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 64, 512])
@pytest.mark.parametrize("static, bias", [(False, False), (True, False), (False, True)])
def test_scaled_mm_matches_ref_with_quantized_inputs(rows, static, bias):
    dev = torch.device("cuda")
    if not scaled_mm_supported(dev):
        pytest.skip("torch._scaled_mm with row-wise scales needs compute capability 9.0 and torch >= 2.5")
    q, scale, gk = quantized_weight(4096, 1024, dev=dev)
    x = torch.randn(rows, 1024, device=dev).to(torch.bfloat16)
    input_scale = (x.float().abs().max() / FP8_MAX).reshape(()) if static else None
    b = torch.randn(4096, device=dev).to(torch.bfloat16) if bias else None
    out = fp8_linear_scaled_mm(x, q, scale, b, input_scale)
    ref = fp8_linear_ref(x, q, scale, gk, b, input_scale, quantize_input=True)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 8, 64, 1024])
def test_fp8_weight_gemm_on_gpu_with_block_scales(rows):
    """The GPU path of block-wise (128 x 128) checkpoints at Llama-3-8B's gate_up and down shapes."""
    from tandem.kernels.fp8 import fp8_weight_gemm

    for n, k in [(28672, 4096), (4096, 14336)]:
        q, scale, gk = quantized_weight(n, k, 128, dev=torch.device("cuda"))
        x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
        assert_close(fp8_weight_gemm(x, q, scale, gk), fp8_linear_ref(x.float(), q, scale, gk),
                     TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_fp8_gemv_on_gpu_at_8b_shapes():
    """The batch-1 GEMV with e4m3 weights at Llama-3-8B's projection shapes (compiled Triton)."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        q, scale, gk = quantized_weight(n, k, dev=torch.device("cuda"))
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        assert_close(gemv(x, q, weight_scale=scale, group_k=gk),
                     gemv_ref(x.float(), q, weight_scale=scale, group_k=gk), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("m, n, k, group_k", [(1, 24, 32, 0), (5, 40, 64, 0), (33, 70, 200, 64), (17, 48, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_weight_gemm_matches_ref(m, n, k, group_k, dtype):
    from tandem.kernels.fp8 import fp8_weight_gemm

    q, scale, gk = quantized_weight(n, k, group_k)
    x = torch.randn(m, k, device=device()).to(dtype)
    bias = torch.randn(n, device=device()).to(dtype)
    with poisoned_allocations():
        y = fp8_weight_gemm(x, q, scale, gk, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, fp8_linear_ref(x.float(), q, scale, gk, bias.float()), TOLERANCE[dtype])


# GPU only: the Triton interpreter (3.9) rounds float32 -> e4m3 wrongly where rounding carries into
# the next exponent (124.3 -> 64 instead of 128); the other kernels only convert e4m3 -> float32.
@pytest.mark.gpu
@pytest.mark.parametrize("m, k", [(1, 64), (7, 300), (3, 5000), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_triton_matches_torch(m, k, dtype):
    from tandem.kernels.fp8 import quantize_rows_triton

    x = (torch.randn(m, k, device=device()) * torch.logspace(-2, 2, m, device=device())[:, None]).to(dtype)
    x[0, :] = 0 if m > 1 else x[0, :]  # an all-zero row keeps a finite scale
    with poisoned_allocations():
        q, scale = quantize_rows_triton(x)
    ref_q, ref_scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (m, 1)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # Where x / scale lands on a rounding tie, a last-bit difference in the division may pick the
    # neighbouring e4m3 value: allow one step on a few elements, nothing more.
    diff = (q.float() - ref_q.float()).abs()
    assert (diff <= E4M3_REL * 2 * ref_q.float().abs() + 2.0**-9).all()
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
@pytest.mark.parametrize("hidden, inter, num_experts, top_k, group_k", [
    (4096, 14336, 8, 2, 0),  # Mixtral-8x7B, per channel: 2048 tokens take the largest tiles
    (2048, 768, 128, 8, 128),  # Qwen3-30B-A3B, 128 x 128 blocks
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_fp8_at_model_shapes_on_gpu(num_tokens, hidden, inter, num_experts, top_k, group_k, dtype):
    """Compiled for the GPU at every tile size `pick_tiles` takes (the interpreter has no shared
    memory to run out of): per-element float32 scale tiles once needed more than an SM has."""
    dev = torch.device("cuda")
    experts = min(num_experts, 8)  # the weights of 8 experts are enough to take every tile size
    w13, w2, scales = fp8_experts(experts, hidden, inter, group_k, dev=dev)
    x = torch.randn(num_tokens, hidden, device=dev).to(dtype)
    weights, ids = torch.topk(torch.softmax(torch.randn(num_tokens, experts, device=dev), -1), min(top_k, experts), -1)
    out = fused_moe(x, w13, w2, weights, ids, scales=scales)
    ref = fused_moe_ref(x, w13, w2, weights, ids, scales=scales)
    assert_close(out, ref, TOLERANCE[dtype])


def test_k_tiles_never_straddle_two_scale_groups():
    from tandem.kernels.fp8 import scale_group_block_k

    assert scale_group_block_k(128, 4096, 4096) == 128  # per channel: one group
    assert scale_group_block_k(64, 4096, 1000) == 64
    assert scale_group_block_k(128, 128, 4096) == 128
    assert scale_group_block_k(128, 64, 4096) == 64
    assert scale_group_block_k(32, 16, 64) == 16
    assert scale_group_block_k(128, 48, 4096) == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        scale_group_block_k(128, 100, 4096)
