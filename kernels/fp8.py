"""FP8 (e4m3) linear algebra: quantizing weights and activations, the plain-torch reference of an
FP8-weight linear layer, and its tensor-core path (`torch._scaled_mm`).

Weights are e4m3 [N, K] (nn.Linear's row-major layout) with float32 scales `weight_scale`
[N, G]: row n, columns [g * group_k, (g + 1) * group_k) dequantize as `weight * scale[n, g]`.
G = 1 is a per-channel scale (a per-tensor scale is stored expanded to every row, which is
exact and lets fused q/k/v or gate/up shards keep their own); G = ceil(K / group_k) holds a
block-wise checkpoint's scales (its 128 x 128 blocks expanded along the rows, so fused shards
whose row counts are not multiples of the block stay exact).

Activations are quantized per token (dynamic: amax of the row / 448) or with one static
per-tensor scale from the checkpoint (`input_scale`).

Where `torch._scaled_mm` does not apply (block-wise scales, shapes that are not multiples of 16,
GPUs before Hopper), `fp8_weight_gemm` (Triton) multiplies in the activation dtype with the weight
dequantized in registers: the weight is still read at one byte per element.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Keeps the scale of an all-zero row (or weight row) finite; any positive value works there.
_MIN_SCALE = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x, float32 scale [rows, 1]) with one scale per row of a 2-D tensor: a weight's
    per-channel scales, or an activation's dynamic per-token ones."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                          FP8_MAX_VALUE: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One row: its amax (first pass), then x / scale rounded to e4m3 (second pass, from cache)."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_VALUE, MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX_VALUE), FP8_MAX_VALUE)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_rows` for a 2-D x: one launch instead of torch's five. GPU only:
    the Triton interpreter's float32 -> e4m3 conversion is wrong where rounding carries into the
    next exponent (tests/kernels/test_fp8.py)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block_k = min(4096, max(16, triton.next_power_of_2(k)))
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                FP8_MAX_VALUE=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=8 if block_k >= 2048 else 4)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 x with one given per-tensor scale (values beyond the range saturate)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 w, float32 scale [ceil(N/bn), ceil(K/bk)]): the block-wise layout of DeepSeek-V3 /
    Qwen3-FP8 checkpoints (`weight_scale_inv`), as `tandem make-model --quantization fp8` writes it."""
    bn, bk = block
    n, k = w.shape
    pad = F.pad(w.float(), (0, -k % bk, 0, -n % bn))
    tiles = pad.unflatten(1, (-1, bk)).unflatten(0, (-1, bn))  # [N/bn, bn, K/bk, bk]
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(2).flatten(0, 1)[:n, :k].contiguous(), scale


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, group_k: int) -> torch.Tensor:
    """float32 [..., N, K] from e4m3 weights and their [..., N, G] scales."""
    scale = weight_scale.float()
    if scale.shape[-1] > 1:
        scale = scale.repeat_interleave(group_k, dim=-1)[..., : weight.shape[-1]]
    return weight.float() * scale


def fake_quantize_input(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """x rounded through e4m3 as the GPU path quantizes it (per token, or the static scale)."""
    if input_scale is None:
        q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        return (q.float() * scale).reshape(x.shape)
    return quantize_static(x, input_scale).float() * input_scale.float()


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_k: int,
                   bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                   quantize_input: bool = False) -> torch.Tensor:
    """Dequantize, then matmul in x's dtype: the CPU path, and (with `quantize_input`) the oracle
    of the GPU path (`fp8_linear_scaled_mm`): x rounded through e4m3, float32 accumulation, the
    output rounded to bfloat16 and the bias added there, as `torch._scaled_mm` with row-wise
    scales gives them. Returns x's dtype."""
    w = dequantize_weight(weight, weight_scale, group_k)
    if quantize_input:
        out = F.linear(fake_quantize_input(x, input_scale), w).to(torch.bfloat16)
        if bias is not None:
            out = out + bias.to(torch.bfloat16)
        return out.to(x.dtype)
    return F.linear(x, w.to(x.dtype), bias)


def scaled_mm_supported(device: torch.device) -> bool:
    """`torch._scaled_mm` with row-wise scales (torch runs a CUTLASS FP8 kernel for those): compute
    capability 9.0+ (Hopper) and torch 2.5+, where row-wise scaling arrived."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 5) and torch.cuda.get_device_capability(device) >= (9, 0)


def scaled_mm_applies(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """The shapes `torch._scaled_mm` takes: K and N multiples of 16, per-channel weight scales."""
    n, k = weight.shape
    return (weight_scale.shape[-1] == 1 and k % 16 == 0 and n % 16 == 0 and weight.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K])^T on the tensor cores: x quantized per token (or with
    the static scale), row-wise scales on both sides. `weight.t()` is the column-major [K, N]
    operand `_scaled_mm` requires. Returns x's dtype."""
    rows = x.shape[0]
    if input_scale is None:
        xq, x_scale = quantize_rows_triton(x)
    else:
        xq = quantize_static(x, input_scale)
        x_scale = input_scale.float().reshape(1, 1).expand(rows, 1).contiguous()
    # Row-wise scaling takes a bf16 output only; a bias is added after (fp32 outputs take none).
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)


@triton.jit
def _fp8_weight_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                            group_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * (w[n, k] * s[n, k // group_k]), the weight tile dequantized to x's
    dtype before the dot, float32 accumulation. A K tile lies inside one scale group
    (`scale_group_block_k`): its scales are one [BLOCK_N] vector, not a tile of their own."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None], mask=w_mask, other=0.0)
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // group_k, mask=mask_n, other=0.0)
        acc = tl.dot(a, (w.to(tl.float32) * s[None, :]).to(a.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def pick_gemm_tiles(rows: int, device: torch.device) -> GemmTiles:
    if device.type != "cuda":
        return GemmTiles(16, 32, 32)  # the interpreter: small tiles keep the tests fast
    if rows <= 16:  # decode: the weight streams once
        return GemmTiles(16, 64, 128, num_warps=4, num_stages=4)
    if rows <= 64:
        return GemmTiles(64, 64, 128, num_warps=4, num_stages=4)
    return GemmTiles(128, 128, 64, num_warps=8, num_stages=3)


def scale_group_block_k(block_k: int, group_k: int, k: int) -> int:
    """The largest K tile (at most `block_k`, a power of two) that never straddles two scale groups
    of `group_k` columns, so the kernels read a tile's scales as one vector per row: a per-element
    scale tile in float32 would take four times the weight tile's shared memory in every pipeline
    stage (more than a Hopper SM has at the largest tiles)."""
    if group_k >= k:
        return block_k
    tile = block_k
    while tile > 16 and group_k % tile:
        tile //= 2
    if group_k % tile:
        raise ValueError(f"FP8 weight scales over groups of {group_k} columns: the Triton kernels need groups of a "
                         f"multiple of 16 columns")
    return tile


def fp8_weight_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_k: int,
                    bias: torch.Tensor | None = None, tiles: GemmTiles | None = None) -> torch.Tensor:
    """Triton version of `fp8_linear_ref` (without input quantization): x [M, K] @ dequant(weight)^T
    in x's dtype, for any [N, G] scale layout. Returns [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1 or weight_scale.shape[0] != n or weight_scale.stride(1) != 1:
        raise ValueError(f"fp8_weight_gemm: x {tuple(x.shape)}, row-major weight {tuple(weight.shape)} "
                         f"and [N, G] scales {tuple(weight_scale.shape)} expected")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    t = tiles or pick_gemm_tiles(m, x.device)
    t = dataclasses.replace(t, block_k=scale_group_block_k(t.block_k, group_k, k))
    _fp8_weight_gemm_kernel[(triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n))](
        x, weight, weight_scale, y, m, n, k, x.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0),
        group_k, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=t.num_warps, num_stages=t.num_stages)
    return y if bias is None else y + bias.to(y.dtype)
