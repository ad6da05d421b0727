"""One seam between the engine and the kernels: each op runs the Triton kernel on CUDA tensors
and the plain-torch reference elsewhere (CPU). Set TANDEM_TRITON_ON_CPU=1 together with
TRITON_INTERPRET=1 to push CPU tensors through the Triton kernels (tests do this)."""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch
import torch.nn.functional as torch_F

from tandem.kernels import activation, block_copy, fp8 as fp8_mod, fused_moe as fused_moe_mod, gemv as gemv_mod, paged_attention, rmsnorm, rope as rope_mod, token_bitmask, write_kv as write_kv_mod

F = TypeVar("F", bound=Callable)


def _takes_triton(t: torch.Tensor) -> bool:
    """CUDA tensors go to Triton; CPU ones too with TANDEM_TRITON_ON_CPU=1 (read per call so tests
    can flip it)."""
    return t.is_cuda or os.environ.get("TANDEM_TRITON_ON_CPU") == "1"


def _dispatch(triton_op: F, ref_op: F) -> F:
    """The op picks by its first tensor argument (`_takes_triton`)."""

    @functools.wraps(triton_op)
    def op(first, *args, **kwargs):
        if _takes_triton(first):
            return triton_op(first, *args, **kwargs)
        return ref_op(first, *args, **kwargs)

    return op  # type: ignore[return-value]


write_kv = _dispatch(write_kv_mod.write_kv, write_kv_mod.write_kv_ref)
paged_decode_attention = _dispatch(paged_attention.paged_decode_attention, paged_attention.paged_decode_attention_ref)
paged_prefill_attention = _dispatch(paged_attention.paged_prefill_attention, paged_attention.paged_prefill_attention_ref)
gather_blocks = _dispatch(block_copy.gather_blocks, block_copy.gather_blocks_ref)
scatter_blocks = _dispatch(block_copy.scatter_blocks, block_copy.scatter_blocks_ref)
rms_norm = _dispatch(rmsnorm.rms_norm, rmsnorm.rms_norm_ref)
fused_add_rms_norm = _dispatch(rmsnorm.fused_add_rms_norm, rmsnorm.fused_add_rms_norm_ref)
rope = _dispatch(rope_mod.rope, rope_mod.rope_ref)
silu_and_mul = _dispatch(activation.silu_and_mul, activation.silu_and_mul_ref)
fused_moe = _dispatch(fused_moe_mod.fused_moe, fused_moe_mod.fused_moe_ref)
apply_token_bitmask = _dispatch(token_bitmask.apply_token_bitmask, token_bitmask.apply_token_bitmask_ref)


def skinny_gemv_enabled() -> bool:
    """One-row steps (batch-1 decode) use `kernels/gemv.py` instead of cuBLAS, and the weights then
    stay row-major. `TANDEM_SKINNY_GEMV=0` turns it off, for A/B runs."""
    return os.environ.get("TANDEM_SKINNY_GEMV", "1") != "0"


def linear(x: torch.Tensor, layer: torch.nn.Module, silu_mul_input: bool = False) -> torch.Tensor:
    """`layer(x)`, or `layer(silu_and_mul(x))` with `silu_mul_input`. One row with a row-major,
    bias-free weight goes through the batch-1 GEMV (Triton, SiLU fused); everything else is cuBLAS.
    A layer with a `weight_scale` holds an FP8 weight (`engine/fp8.Fp8Linear`): see `fp8_linear`."""
    weight = layer.weight
    weight_scale = getattr(layer, "weight_scale", None)
    if (_takes_triton(x) and x.dim() == 2 and x.shape[0] == 1 and layer.bias is None
            and weight.stride(1) == 1 and skinny_gemv_enabled()):
        if weight_scale is None:
            return gemv_mod.gemv(x, weight, silu_mul_input)
        return gemv_mod.gemv(x, weight, silu_mul_input, weight_scale=weight_scale, group_k=layer.group_k)
    if silu_mul_input:
        x = silu_and_mul(x)
    if weight_scale is not None:
        return fp8_linear(x, layer)
    return torch_F.linear(x, weight, layer.bias)


@functools.cache
def _scaled_mm_on(device: torch.device) -> bool:
    return fp8_mod.scaled_mm_supported(device)


def fp8_linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """An FP8-weight layer on rows x [M, K]: the FP8 tensor-core GEMM (`torch._scaled_mm`, activations
    quantized per token or with the static scale) where the GPU and the shapes allow it (per-channel
    scales, Hopper); else on a GPU the Triton GEMM that dequantizes the weight in registers
    (block-wise checkpoints), and on a CPU the reference (weights dequantized, then a matmul in x's
    dtype). Those two and the batch-1 GEMV multiply in x's precision."""
    if (x.is_cuda and _scaled_mm_on(x.device)
            and fp8_mod.scaled_mm_applies(x, layer.weight, layer.weight_scale)):
        return fp8_mod.fp8_linear_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias, layer.input_scale)
    if _takes_triton(x):
        return fp8_mod.fp8_weight_gemm(x, layer.weight, layer.weight_scale, layer.group_k, layer.bias)
    return fp8_mod.fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.group_k, layer.bias,
                                  layer.input_scale, quantize_input=getattr(layer, "quantize_input", False))
