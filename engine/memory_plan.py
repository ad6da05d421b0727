"""How the device's memory is divided before the KV pool is allocated: what the engine holds
besides the pool, measured, and the pool gets the rest of `gpu_memory_utilization` x total.

    pool = total x utilization - in use (weights, CUDA context, workspaces; the allocator's cache
           emptied first) - activation peak - graph reserve

- activation peak: measured by a profile step (`ModelRunner._profile_step`) at the step token
  budget, with logits for as many rows as can sample in a step and the sampler's top-k/top-p
  workspace over them: the most an eager step allocates beyond what stays;
- graph reserve: the same measurement at the largest CUDA-graph step (the graphs' memory pool is
  captured after the KV pool and stays held while eager steps run beside it); 0 with
  `enforce_eager`.

`ModelRunner.memory_plan` keeps the plan; `describe()` prints it (bench/probes/memory_breakdown.py
adds what the graphs really took).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int  # the device's memory
    gpu_memory_utilization: float
    in_use_bytes: int  # before the pool: weights + CUDA context + workspaces (+ other processes)
    weights_bytes: int  # of which the model's parameters and buffers
    activation_peak_bytes: int
    graph_reserve_bytes: int
    bytes_per_block: int
    num_blocks: int

    @property
    def budget_bytes(self) -> int:
        return int(self.total_bytes * self.gpu_memory_utilization)

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def as_dict(self) -> dict:
        return dict(asdict(self), budget_bytes=self.budget_bytes, kv_bytes=self.kv_bytes)

    def describe(self) -> str:
        rows = [
            ("device memory", self.total_bytes),
            (f"x gpu_memory_utilization {self.gpu_memory_utilization:g}", self.budget_bytes),
            ("- in use before the pool", self.in_use_bytes),
            ("    of which weights", self.weights_bytes),
            ("    of which CUDA context, workspaces, others", self.in_use_bytes - self.weights_bytes),
            ("- activation peak (profiled eager step)", self.activation_peak_bytes),
            ("- CUDA-graph reserve (profiled largest graph step)", self.graph_reserve_bytes),
            (f"= KV pool: {self.num_blocks} blocks x {self.bytes_per_block} B", self.kv_bytes),
        ]
        return "\n".join(f"{name:<52} {value / GIB:9.2f} GiB" for name, value in rows)


def plan_kv_pool(total_bytes: int, free_bytes: int, gpu_memory_utilization: float, weights_bytes: int,
                 activation_peak_bytes: int, graph_reserve_bytes: int, bytes_per_block: int) -> MemoryPlan:
    """The plan for a device with `free_bytes` of `total_bytes` free now (the allocator's cache
    emptied, the profile steps' memory returned). RuntimeError if not one block fits."""
    in_use = total_bytes - free_bytes
    room = int(total_bytes * gpu_memory_utilization) - in_use - activation_peak_bytes - graph_reserve_bytes
    num_blocks = max(room, 0) // bytes_per_block
    plan = MemoryPlan(total_bytes, gpu_memory_utilization, in_use, weights_bytes, activation_peak_bytes,
                      graph_reserve_bytes, bytes_per_block, num_blocks)
    if num_blocks < 1:
        raise RuntimeError("not enough device memory for even one KV block; raise gpu_memory_utilization, lower "
                           f"max_num_batched_tokens / max_num_seqs, or use a smaller model:\n{plan.describe()}")
    return plan
