"""Write new K/V rows into their cache slots; an FP8 cache stores them quantized (below)."""
import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_kwargs, pdl_prologue

# FP8 KV cache (e4m3, vLLM's convention): the cache holds x / scale rounded to e4m3, saturated at
# the format's largest finite value; readers multiply by the same per-layer scale.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = float(torch.finfo(FP8_KV_DTYPE).max)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize_kv_ref(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it: unchanged (cast) for a 16/32-bit cache, x / scale in e4m3 for FP8
    (as x * (1 / scale), the kernel's arithmetic)."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    k_scale: float = 1.0,  # FP8 cache only: stored = k / k_scale (ignored otherwise)
    v_scale: float = 1.0,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = quantize_kv_ref(k[keep], k_scale, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = quantize_kv_ref(v[keep], v_scale, v_cache.dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_blk, stride_kc_tok, stride_kc_h,
    stride_vc_blk, stride_vc_tok, stride_vc_h,
    inv_k_scale, inv_v_scale,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr,
):
    # One program per token: all its heads, K and V.
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // CACHE_BLOCK
    offset = slot % CACHE_BLOCK
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_k_t + heads * stride_k_h + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_v_t + heads * stride_v_h + dims, mask=mask)
    if QUANTIZE:  # FP8 cache: scale in fp32, saturate, round to nearest e4m3 on the store
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX).to(k_cache_ptr.dtype.element_ty,
                                                                         fp_downcast_rounding="rtne")
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX, FP8_MAX).to(v_cache_ptr.dtype.element_ty,
                                                                         fp_downcast_rounding="rtne")
    tl.store(k_cache_ptr + block * stride_kc_blk + offset * stride_kc_tok + heads * stride_kc_h + dims, k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_blk + offset * stride_vc_tok + heads * stride_vc_h + dims, v, mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton version of `write_kv_ref`. k/v may be strided views (e.g. slices of a fused qkv
    output) as long as head_dim is contiguous."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        CACHE_BLOCK=k_cache.shape[1], QUANTIZE=is_fp8(k_cache.dtype), FP8_MAX=FP8_E4M3_MAX,
        num_warps=4, **launch_kwargs(k.device),
    )
