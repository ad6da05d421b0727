"""Gather whole cache blocks into a contiguous staging buffer and scatter them back (KV transfer)."""
import torch


def gather_blocks_ref(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, H, D], block_ids [n] -> staging [n, bs, H, D] (contiguous)."""
    return cache.index_select(0, block_ids.long())


def scatter_blocks_ref(staging: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """staging [n, bs, H, D] -> cache[block_ids]."""
    cache.index_copy_(0, block_ids.long(), staging)
