"""Write new K/V rows into their cache slots."""
import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_kwargs, pdl_prologue


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_blk, stride_kc_tok, stride_kc_h,
    stride_vc_blk, stride_vc_tok, stride_vc_h,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
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
    tl.store(k_cache_ptr + block * stride_kc_blk + offset * stride_kc_tok + heads * stride_kc_h + dims, k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_blk + offset * stride_vc_tok + heads * stride_vc_h + dims, v, mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
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
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        CACHE_BLOCK=k_cache.shape[1],
        num_warps=4, **launch_kwargs(k.device),
    )
