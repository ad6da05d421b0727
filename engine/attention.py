"""Paged attention for one layer, and the per-step context every layer reads.

The model runner builds one `ForwardContext` per step and passes it down explicitly (no
globals). Attention writes the step's new K/V into their cache slots, then attends over the
whole paged context of each sequence.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.kernels import ops


@dataclass
class ForwardContext:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens in cache after this step, per sequence
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens per sequence, packed
    is_decode: bool  # every sequence computes exactly one token
    kv_cache: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    # Called with i once layer i's KV is written (issued, on the GPU): the KV connector streams
    # it out while the later layers run. Eager steps only (a CUDA graph cannot call back).
    layer_done: Callable[[int], None] | None = None


def paged_attention(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: ForwardContext,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] for the step's new tokens -> [T, Hq, D]. `k_scale`/`v_scale`:
    the layer's FP8 KV cache scales (ignored by a cache in the model dtype)."""
    k_cache, v_cache = ctx.kv_cache[layer_idx, 0], ctx.kv_cache[layer_idx, 1]
    ops.write_kv(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
    if ctx.is_decode:
        return ops.paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                                          k_scale, v_scale)
    return ops.paged_prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.block_tables,
                                       ctx.context_lens, scale, k_scale, v_scale)
