"""Rotary position embedding, neox style (rotate-half), as HF Llama/Qwen apply it.

`cos_sin` is precomputed per position: [max_positions, head_dim] float32, first half cos of
the rotary angles, second half sin (Llama-3 scaling is folded into the angles by the caller).
"""
import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_kwargs, pdl_prologue


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0) -> torch.Tensor:
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    return torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rope_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [P, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin.shape[-1] // 2
    cs = cos_sin[positions.long()].to(q.dtype)  # HF casts cos/sin to the activation dtype
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_x_t, stride_x_h, stride_o_t, stride_o_h, token, cos, sin,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = x_ptr + token * stride_x_t + heads * stride_x_h + dims
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    # Round every product and sum to the activation dtype, as HF's eager ops do.
    x1c = (x1.to(tl.float32) * cos).to(dtype).to(tl.float32)
    x2s = (x2.to(tl.float32) * sin).to(dtype).to(tl.float32)
    x2c = (x2.to(tl.float32) * cos).to(dtype).to(tl.float32)
    x1s = (x1.to(tl.float32) * sin).to(dtype).to(tl.float32)
    dst = out_ptr + token * stride_o_t + heads * stride_o_h + dims
    tl.store(dst, (x1c - x2s).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2c + x1s).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h, stride_cs,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    # One program per token: cos/sin are read once and applied to all its q and k heads.
    pdl_prologue(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]
    cs_mask = dims < HALF
    act_dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=cs_mask, other=0.0).to(act_dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims, mask=cs_mask, other=0.0).to(act_dtype).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_q_t, stride_q_h, stride_qo_t, stride_qo_h, token, cos, sin,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, stride_k_t, stride_k_h, stride_ko_t, stride_ko_h, token, cos, sin,
                  NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rope_ref`. Returns fresh contiguous tensors; q and k (which may be strided
    views of a fused qkv output, head_dim contiguous) are left untouched."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert cos_sin.shape[-1] == head_dim and q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4, **launch_kwargs(q.device),
    )
    return q_out, k_out
