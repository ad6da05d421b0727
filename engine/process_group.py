"""A standalone torch.distributed process group for the ranks of one parallel group (expert or
tensor parallel): NCCL on GPU, gloo on CPU, made from a TCPStore under the group's own prefix.

No global default world is created, so several groups (one per replica, each with its own
degree) live side by side in one Ray cluster and come and go independently."""
from __future__ import annotations

from datetime import timedelta

import torch
from torch.distributed import PrefixStore, Store


def make_process_group(store: Store, prefix: str, rank: int, world_size: int, device: torch.device,
                       timeout_s: float = 60.0):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        return ProcessGroupNCCL(PrefixStore(prefix, store), rank, world_size, timeout)
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(PrefixStore(prefix, store), rank, world_size, timeout)


def reduce_op(name: str):
    from torch.distributed import ReduceOp

    return getattr(ReduceOp, name)
