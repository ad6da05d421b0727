"""FP8 (e4m3) linear algebra: quantizing weights and activations, the plain-torch reference of an
FP8-weight linear layer, and its cuBLASLt path (`torch._scaled_mm`).

Weights are e4m3 [N, K] (nn.Linear's row-major layout) with float32 scales `weight_scale`
[N, G]: row n, columns [g * group_k, (g + 1) * group_k) dequantize as `weight * scale[n, g]`.
G = 1 is a per-channel scale (a per-tensor scale is stored expanded to every row, which is
exact and lets fused q/k/v or gate/up shards keep their own); G = ceil(K / group_k) holds a
block-wise checkpoint's scales (its 128 x 128 blocks expanded along the rows, so fused shards
whose row counts are not multiples of the block stay exact).

Activations are quantized per token (dynamic: amax of the row / 448) or with one static
per-tensor scale from the checkpoint (`input_scale`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """Dequantize, then matmul in x's dtype: the CPU path, and (with `quantize_input`, which
    rounds x through e4m3 first) the oracle of the GPU path, whose tensor cores multiply FP8
    activations. Returns x's dtype."""
    w = dequantize_weight(weight, weight_scale, group_k)
    if quantize_input:
        x32 = fake_quantize_input(x, input_scale)
        out = F.linear(x32, w, None if bias is None else bias.float())
        return out.to(x.dtype)
    return F.linear(x, w.to(x.dtype), bias)


def scaled_mm_supported(device: torch.device) -> bool:
    """`torch._scaled_mm` with row-wise scales: cuBLASLt FP8 on compute capability 9.0+ (Hopper);
    row-wise scaling arrived in torch 2.5."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 5) and torch.cuda.get_device_capability(device) >= (9, 0)


def scaled_mm_applies(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """The shapes cuBLASLt's FP8 GEMM takes: K and N multiples of 16, per-channel weight scales."""
    n, k = weight.shape
    return (weight_scale.shape[-1] == 1 and k % 16 == 0 and n % 16 == 0 and weight.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K])^T on the tensor cores: x quantized per token (or with
    the static scale), row-wise scales on both sides. `weight.t()` is the column-major [K, N]
    operand cuBLASLt requires. Returns x's dtype."""
    rows = x.shape[0]
    if input_scale is None:
        xq, x_scale = quantize_rows(x)
    else:
        xq = quantize_static(x, input_scale)
        x_scale = input_scale.float().reshape(1, 1).expand(rows, 1).contiguous()
    # Row-wise scaling takes a bf16 output only; a bias is added after (fp32 outputs take none).
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)
