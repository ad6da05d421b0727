"""Packing a layer range of chosen blocks into one contiguous staging buffer, and back.

A message's staging buffer is [layers, 2 (K,V), n, block_size, h, D], h = the heads it carries
(all H of the cache, or a head slice [s, e) for tensor parallelism). For all heads, because
`kv_cache` is contiguous, layers [a, b) of it are one [(b-a)*2*num_blocks, bs, H, D] block array,
so a single `ops.gather_blocks` / `ops.scatter_blocks` call moves a whole message (Triton on
GPU). A head slice is strided inside each block, so it moves with one `index_select` /
`index_copy_` over the sliced view instead: still one copy per message, of only its bytes.
"""
from __future__ import annotations

import math

import torch

from tandem.kernels import ops


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    if not isinstance(kv_cache, torch.Tensor):
        raise TypeError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError("kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, "
                         f"head_dim], got shape {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def check_kv_scales(kv_cache: torch.Tensor, kv_scales) -> list[float]:
    """The scales a sender announces / a receiver expects, as floats: an FP8 cache's per-layer
    (k, v) dequantization scales (all 1.0 if none were given); none for a 16/32-bit cache."""
    scales = [float(s) for s in kv_scales]
    if kv_cache.element_size() != 1 or not kv_cache.dtype.is_floating_point:
        if scales:
            raise ValueError(f"kv_scales are only for an FP8 cache, not {kv_cache.dtype}")
        return []
    if not scales:
        return [1.0] * (2 * kv_cache.shape[0])
    if len(scales) != 2 * kv_cache.shape[0] or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"kv_scales must be {2 * kv_cache.shape[0]} finite positive numbers (k, v per layer), "
                         f"got {len(scales)}")
    return scales


def staging_shape(kv_cache: torch.Tensor, num_layers: int, num_blocks: int,
                  heads: tuple[int, int] | None = None) -> list[int]:
    _, _, _, bs, num_heads, dim = kv_cache.shape
    start, end = (0, num_heads) if heads is None else heads
    return [num_layers, 2, num_blocks, bs, end - start, dim]


def _is_all_heads(kv_cache: torch.Tensor, heads: tuple[int, int] | None) -> bool:
    return heads is None or tuple(heads) == (0, kv_cache.shape[4])


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _head_view(kv_cache: torch.Tensor, layer_start: int, layer_end: int,
               heads: tuple[int, int]) -> torch.Tensor:
    """kv_cache[layer_start:layer_end, ..., s:e, :] as integers of the same width: a copy must
    move bytes, and torch has no index_copy_ for float8."""
    start, end = heads
    return kv_cache.view(_BITS[kv_cache.element_size()])[layer_start:layer_end, :, :, :, start:end]


def _flat_ids(kv_cache: torch.Tensor, layer_start: int, layer_end: int,
              block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = kv_cache.shape[2]
    flat = kv_cache[layer_start:layer_end].view(-1, *kv_cache.shape[3:])
    planes = torch.arange((layer_end - layer_start) * 2, device=block_ids.device, dtype=torch.int64)
    ids = (planes[:, None] * num_blocks + block_ids[None, :]).reshape(-1)
    return flat, ids


def gather_layers(kv_cache: torch.Tensor, layer_start: int, layer_end: int,
                  block_ids: torch.Tensor, heads: tuple[int, int] | None = None) -> torch.Tensor:
    """kv_cache[layer_start:layer_end, :, block_ids, :, s:e] as one contiguous staging buffer
    (`heads` = (s, e); None: all heads)."""
    if _is_all_heads(kv_cache, heads):
        flat, ids = _flat_ids(kv_cache, layer_start, layer_end, block_ids)
        staging = ops.gather_blocks(flat, ids)
        return staging.view(staging_shape(kv_cache, layer_end - layer_start, block_ids.numel()))
    staging = _head_view(kv_cache, layer_start, layer_end, heads).index_select(2, block_ids)
    return staging.contiguous().view(kv_cache.dtype)


def scatter_layers(staging: torch.Tensor, kv_cache: torch.Tensor, layer_start: int, layer_end: int,
                   block_ids: torch.Tensor, heads: tuple[int, int] | None = None) -> None:
    """Inverse of `gather_layers`: writes staging into kv_cache[layer_start:layer_end, :,
    block_ids, :, s:e]; every other block and head is left as it was."""
    if _is_all_heads(kv_cache, heads):
        flat, ids = _flat_ids(kv_cache, layer_start, layer_end, block_ids)
        ops.scatter_blocks(staging.reshape(-1, *kv_cache.shape[3:]), flat, ids)
        return
    bits = _BITS[kv_cache.element_size()]
    _head_view(kv_cache, layer_start, layer_end, heads).index_copy_(2, block_ids, staging.view(bits))


def block_id_tensor(block_ids, num_blocks: int, device: torch.device, what: str,
                    unique: bool) -> torch.Tensor:
    """Validated int64 tensor of block ids (clear ValueError on bad input)."""
    ids = [int(b) for b in block_ids] if not isinstance(block_ids, torch.Tensor) else block_ids.tolist()
    if not ids:
        raise ValueError(f"{what} must not be empty")
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what} out of range [0, {num_blocks}): {bad[:8]}")
    if unique and len(set(ids)) != len(ids):
        raise ValueError(f"{what} contains duplicates")
    return torch.tensor(ids, dtype=torch.int64, device=device)
