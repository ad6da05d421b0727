"""Tensor parallelism (Megatron-style): N ranks run one model together, each holding a slice of
every layer. Column-parallel fused q/k/v and gate/up (rank r owns its heads and its slice of the
MLP's intermediate dimension), row-parallel o_proj and down_proj whose partial outputs are
summed by one all-reduce each, a vocab-parallel embedding (each rank looks up the ids in its
vocab slice, one all-reduce) and lm_head (each rank computes its vocab slice of the logits, one
all-gather). KV heads are split across ranks; when there are fewer KV heads than ranks, each KV
head is replicated on tp / num_kv_heads ranks (as vLLM does), so a rank still holds whole heads.

This module holds the group (rank, world size, process group; passed to the model's
constructors, never a global) and the shard arithmetic. `engine.tp_runner` runs the ranks in
lockstep; `engine.tp_ranks` starts the offline LLM's rank processes.

Logits are all-gathered rather than gathered to rank 0: NCCL has a native all-gather (its gather
is point-to-point sends), both capture in CUDA graphs, and the bytes reaching rank 0 are the
same; the other ranks receive logits they ignore. Sampling happens once, on rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import Store

from tandem.engine.process_group import make_process_group, reduce_op


def split_evenly(size: int, rank: int, world_size: int, what: str) -> range:
    """Rank r's contiguous 1/world_size of `size` units; ValueError unless it divides."""
    if size % world_size:
        raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size ({world_size})")
    part = size // world_size
    return range(rank * part, (rank + 1) * part)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds (global head indices)."""
    q_heads: range
    kv_heads: range


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Query heads split evenly; KV heads split evenly, or (world_size > num_kv_heads) each KV
    head replicated on world_size / num_kv_heads consecutive ranks: the ranks whose query heads
    read it under grouped-query attention."""
    return HeadShard(split_evenly(num_heads, rank, world_size, "num_attention_heads"),
                     kv_head_shard(num_kv_heads, rank, world_size))


def kv_head_shard(num_kv_heads: int, rank: int, world_size: int) -> range:
    """The KV heads rank `rank`'s cache holds (`head_shard`'s; they depend on nothing else)."""
    if world_size <= num_kv_heads:
        return split_evenly(num_kv_heads, rank, world_size, "num_key_value_heads")
    if world_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({world_size}) exceeds num_key_value_heads ({num_kv_heads}) "
                         "and is not a multiple of it, so KV heads cannot be replicated evenly")
    kv = rank // (world_size // num_kv_heads)
    return range(kv, kv + 1)


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> tuple[range, int]:
    """(rank r's slice of the vocabulary, rows per rank): the vocabulary is padded up to a
    multiple of world_size; the last rank's padding rows hold zeros and their logits are cut."""
    rows = -(-vocab_size // world_size)
    return range(min(rank * rows, vocab_size), min((rank + 1) * rows, vocab_size)), rows


def check_tensor_parallel(hf_config, world_size: int) -> None:
    """ValueError, saying why, unless the model's shapes split over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if world_size == 1:
        return
    for rank in range(world_size):
        head_shard(hf_config.num_attention_heads, hf_config.num_key_value_heads, rank, world_size)
    split_evenly(hf_config.intermediate_size, 0, world_size, "intermediate_size")
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(hf_config, name, None):
            split_evenly(getattr(hf_config, name), 0, world_size, name)


class TensorParallelGroup:
    """One rank's view of its tensor-parallel group. Every collective here must be called by
    every rank of the group, in the same order."""

    def __init__(self, store: Store, rank: int, world_size: int, device: torch.device | str = "cpu",
                 prefix: str = "tp/0", timeout_s: float = 300.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.store = store
        self.prefix = prefix
        self.group = make_process_group(store, prefix, rank, world_size, self.device, timeout_s)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        self.group.allreduce([x], reduce_op("SUM")).wait()
        return x

    def all_reduce_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        self.group.allreduce([t], reduce_op("MIN")).wait()
        return int(t.item())

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n] on each rank -> [N, world_size * n], rank r's columns at r * n."""
        if x.numel() == 0:  # every rank has the same row count (same step)
            return x.new_empty((x.shape[0], x.shape[1] * self.world_size))
        out = x.new_empty((self.world_size * x.shape[0], x.shape[1]))
        self.group._allgather_base(out, x.contiguous()).wait()
        return out.view(self.world_size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype on all), in place."""
        self.group.broadcast(x, 0).wait()
        return x
