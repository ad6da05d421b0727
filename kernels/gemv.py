"""Batch-1 GEMV: y = x @ W^T for one row x [1, K], the batch-1 decode step's projections.

Why not cuBLAS there: at small M a projection is a pure weight read, and two things cost time
besides the bytes (`bench/probes/gemv_probe.py --triton-sweep`, H100, weights cycled so every call
reads HBM): cuBLAS's kernels for the smaller Llama-3-8B projections launch too few CTAs to
keep HBM busy (qkv 2.49 TB/s, o_proj 2.04-2.42 TB/s, against ~3.0 for gate_up and lm_head),
and every kernel ramps up from idle. Here each program owns a few whole rows of W (long
contiguous runs, hundreds of programs), and with programmatic dependent launch
(`kernels/pdl.py`) it loads its first weight tile *before* waiting for the previous kernel,
since weights never depend on it: the ramp overlaps the small kernels before the projection.

The product is an FMA reduction with fp32 accumulation. A `tl.dot` version for 2-16 rows (x
padded to 16) was measured and dropped: slower than cuBLAS at every shape but qkv (e.g. down at
M = 4-16: 97-106 us against 44-45; the M > 1 rows of `gemv_skinny_sweep_h100.json`), so steps of
two or more rows use cuBLAS. So was an FMA version for 2-8 rows that reads each weight tile once
and multiplies it into every row (commit 6e7623d, reverted): its time grew with the rows (down +
SiLU 65 / 120 / 203 us at M = 2 / 4 / 8, cuBLAS ~45), so the products, not the weight reads, set
it; slower than cuBLAS at every projection even at M = 2 (`gemv_rows_fma_sweep_h100.json`).

`silu_mul_input=True` takes x = [gate | up] (2K wide) and uses silu(gate) * up, rounded as
`kernels.activation.silu_and_mul` rounds it, so the MLP's down projection needs no separate
activation kernel. W must be row-major [N, K] (nn.Linear's own layout). An FP8 (e4m3) W with
its float32 scales (`kernels/fp8.py`'s layout) is dequantized in registers: half the bytes read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tandem.kernels.fp8 import dequantize_weight
from tandem.kernels.pdl import launch_kwargs, pdl_prologue


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, silu_mul_input: bool = False, *,
             weight_scale: torch.Tensor | None = None, group_k: int = 0) -> torch.Tensor:
    if silu_mul_input:
        half = x.shape[-1] // 2
        x = F.silu(x[..., :half]) * x[..., half:]
    if weight_scale is not None:
        weight = dequantize_weight(weight, weight_scale, group_k).to(x.dtype)
    return F.linear(x, weight)


@triton.jit
def _input_chunk(x_ptr, offs_k, mask_k, K, SILU_MUL: tl.constexpr):
    """x[offs_k] as fp32; with SILU_MUL, silu(gate) * up."""
    if SILU_MUL:
        gate = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
        return (silu * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        return tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_sn, GROUP_K,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
                 SCALE: tl.constexpr):
    """SCALE: 0 = none; 1 = FP8 weight with a per-channel scale s[n] (applied once to the sum);
    2 = FP8 weight with per-group scales s[n, k // GROUP_K] (applied in registers, per tile)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    # The first weight tile is read before waiting for the previous kernel (see the module doc),
    # and each next tile is loaded before the current one is used.
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    pdl_prologue(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs_k
        x = _input_chunk(x_ptr, offs, offs < K, K, SILU_MUL)
        nxt = offs + BLOCK_K
        w_next = tl.load(w_rows + nxt[None, :], mask=mask_n[:, None] & (nxt < K)[None, :], other=0.0)
        w32 = w.to(tl.float32)
        if SCALE == 2:
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs // GROUP_K)[None, :],
                        mask=mask_n[:, None] & (offs < K)[None, :], other=0.0)
            w32 = w32 * s
        acc += w32 * x[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)
    if SCALE == 1:
        y = y * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


# (BLOCK_N, BLOCK_K, num_warps): among the best at every Llama-3-8B projection in the H100 sweep
# (`bench/results/probes/gemv_skinny_sweep_h100.json`, M = 1): within 4% of each shape's best tile (qkv
# 18.4 vs 17.7 us), within 1% for the others.
TILES = (8, 1024, 4)
# e4m3 weights: the bf16 tile too. Twice the columns and warps (to keep the bf16 tile's bytes in
# flight) was the slowest of the six tiles the H100 sweep tried over the four projections, the bf16
# tile among the fastest (`bench/results/probes/fp8_gemm_probe_h100.json`, M = 1).
FP8_TILES = (8, 1024, 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, silu_mul_input: bool = False, *,
         weight_scale: torch.Tensor | None = None, group_k: int = 0,
         tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton version of `gemv_ref` for one row: x [1, K] (or [1, 2K] with `silu_mul_input`) and a
    row-major weight [N, K]. With `weight_scale` the weight is e4m3 and dequantizes as
    `kernels.fp8.dequantize_weight(weight, weight_scale, group_k)` ([N, 1]: per channel).
    Returns [1, N] in x's dtype."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != (2 * k if silu_mul_input else k):
        raise ValueError(f"x has {x.shape[1]} columns for a weight of shape {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError(f"gemv needs a row-major weight, got strides {weight.stride()}")
    scale_mode, s, stride_sn = 0, weight, 0  # unused pointer when there is no scale
    if weight_scale is not None:
        if weight_scale.dim() != 2 or weight_scale.shape[0] != n or weight_scale.stride(1) != 1:
            raise ValueError(f"weight_scale must be [N, G] row-major for a weight of shape {tuple(weight.shape)}, "
                             f"got {tuple(weight_scale.shape)}")
        scale_mode = 1 if weight_scale.shape[1] == 1 else 2
        if scale_mode == 2 and weight_scale.shape[1] != -(-k // group_k):
            raise ValueError(f"{weight_scale.shape[1]} scale groups for K={k} in groups of {group_k}")
        s, stride_sn = weight_scale, weight_scale.stride(0)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = tiles or (TILES if weight_scale is None else FP8_TILES)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, s, y, n, k, weight.stride(0), stride_sn, max(group_k, 1),
        BLOCK_N=block_n, BLOCK_K=block_k, SILU_MUL=silu_mul_input, SCALE=scale_mode, num_warps=num_warps,
        **launch_kwargs(x.device))
    return y
