"""Expert parallelism: N processes (one per GPU) run one MoE model together. Attention and the
dense layers are replicated (each rank serves its own batch, data parallel); rank r holds only
its contiguous slice of every MoE layer's experts. In each MoE layer a rank sends each of its
(token, expert) pairs to the rank that owns the expert, that rank runs its experts over
everything it received, and the outputs travel back to be weighted and summed.

The group is a standalone process group (NCCL on GPU, gloo on CPU) made from a TCPStore under
its own prefix: no global torch.distributed world is needed, so a prefill pool and a decode pool
can each run their own expert-parallel degree. Every rank must call each MoE layer in step
(same number of forward passes, a rank with no tokens passes an empty batch).

Engine-level step sync: each rank's engine serves its own requests, so ranks get unequal work.
`ExpertParallelModelRunner` (`engine.ep_runner`) is a collective runner: `LLMEngine.step()` first calls `sync_step`
(one all-reduce of [has requests, tokens scheduled]); when some rank has tokens, every rank
runs a forward, and one with nothing scheduled runs `execute_idle` (one padding token whose KV
goes nowhere and whose routing is not counted as expert load). When no rank has tokens nobody
runs the model. The driving loops (`LLM.generate`, `AsyncLLM`) keep stepping while
`LLMEngine.must_step()`: local requests, or some rank had requests at the last step, so all
ranks leave on the same step.

Dispatch is an `all_to_all_single` with per-rank split sizes. Builds of gloo without all-to-all
get the CPU fallback: every rank all-gathers all tokens (padded to the largest batch), applies
its own experts to all of them, and an all-reduce sums the partial outputs; correct, but it moves
N times the bytes, so it is meant for CPU tests only.

The expert load statistics (tokens routed to each expert) live with the model, in
`engine.models.moe` (`ExpertLoadStats`).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch.distributed import Store

from tandem.engine.process_group import make_process_group, reduce_op as _reduce_op


# (rows [R, H], local expert ids [R]) -> unweighted expert outputs [R, H]
LocalExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DispatchMode = Literal["auto", "all_to_all", "all_gather"]


def expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """Rank r's contiguous slice of the experts; the first E % N ranks hold one more."""
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class ExpertParallelGroup:
    def __init__(self, store: Store, rank: int, world_size: int, device: torch.device | str = "cpu",
                 prefix: str = "ep/0", dispatch: DispatchMode = "auto", timeout_s: float = 60.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.group = make_process_group(store, prefix, rank, world_size, self.device, timeout_s)
        self.dispatch_mode: DispatchMode = self._probe_all_to_all() if dispatch == "auto" else dispatch

    def expert_range(self, num_experts: int) -> range:
        return expert_range(num_experts, self.rank, self.world_size)

    def agree_on_step(self, has_requests: bool, num_tokens: int) -> tuple[bool, int]:
        """(does any rank have requests, the most tokens any rank scheduled) for this step.
        Collective: every rank calls it once per engine step."""
        flags = torch.tensor([int(has_requests), num_tokens], dtype=torch.long, device=self.device)
        self.group.allreduce([flags], _reduce_op("MAX")).wait()
        any_requests, max_tokens = flags.tolist()
        return bool(any_requests), int(max_tokens)

    # ----------------------------------------------------------------- dispatch + combine
    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    num_experts: int, local_experts: LocalExperts) -> torch.Tensor:
        """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for this rank's tokens, with
        each expert computed on the rank that holds it. Collective: every rank calls it."""
        if self.dispatch_mode == "all_to_all":
            return self._run_all_to_all(x, topk_weights, topk_ids, num_experts, local_experts)
        return self._run_all_gather(x, topk_weights, topk_ids, num_experts, local_experts)

    def _run_all_to_all(self, x, topk_weights, topk_ids, num_experts, local_experts):
        num_tokens, hidden = x.shape
        top_k = topk_ids.shape[1]
        bounds = torch.tensor([expert_range(num_experts, r, self.world_size).stop
                               for r in range(self.world_size)], device=x.device)
        flat_ids = topk_ids.reshape(-1).long()
        owner = torch.searchsorted(bounds, flat_ids, right=True)
        order = torch.argsort(owner, stable=True)  # pairs grouped by owner rank
        send_counts = torch.zeros(self.world_size, dtype=torch.long, device=x.device)
        send_counts.scatter_add_(0, owner, torch.ones_like(owner))
        recv_counts = torch.empty_like(send_counts)
        self.group.alltoall_base(recv_counts, send_counts, [], []).wait()
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # the one host sync

        owner_first = bounds - torch.tensor([len(expert_range(num_experts, r, self.world_size))
                                             for r in range(self.world_size)], device=x.device)
        send_x = x[order // top_k]
        send_local_ids = flat_ids[order] - owner_first[owner[order]]
        recv_x = x.new_empty((sum(recv_splits), hidden))
        recv_ids = send_local_ids.new_empty(sum(recv_splits))
        self.group.alltoall_base(recv_x, send_x, recv_splits, send_splits).wait()
        self.group.alltoall_base(recv_ids, send_local_ids, recv_splits, send_splits).wait()

        expert_out = local_experts(recv_x, recv_ids)
        back = x.new_empty((num_tokens * top_k, hidden))
        self.group.alltoall_base(back, expert_out.contiguous(), send_splits, recv_splits).wait()

        per_pair = torch.empty((num_tokens * top_k, hidden), dtype=torch.float32, device=x.device)
        per_pair[order] = back.float() * topk_weights.reshape(-1)[order, None].float()
        return per_pair.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)

    def _run_all_gather(self, x, topk_weights, topk_ids, num_experts, local_experts):
        num_tokens, hidden = x.shape
        top_k = topk_ids.shape[1]
        size = torch.tensor([num_tokens], device=x.device)
        self.group.allreduce([size], _reduce_op("MAX")).wait()
        padded = int(size.item())
        pad = padded - num_tokens
        x_pad = torch.cat([x, x.new_zeros((pad, hidden))])
        ids_pad = torch.cat([topk_ids.long(), topk_ids.new_full((pad, top_k), -1).long()])
        w_pad = torch.cat([topk_weights.float(), topk_weights.new_zeros((pad, top_k)).float()])
        all_x = [torch.empty_like(x_pad) for _ in range(self.world_size)]
        all_ids = [torch.empty_like(ids_pad) for _ in range(self.world_size)]
        all_w = [torch.empty_like(w_pad) for _ in range(self.world_size)]
        for outputs, tensor in ((all_x, x_pad), (all_ids, ids_pad), (all_w, w_pad)):
            self.group.allgather([outputs], [tensor]).wait()
        ids = torch.cat(all_ids)
        mine = self.expert_range(num_experts)
        held = (ids >= mine.start) & (ids < mine.stop)
        rows, slots = torch.where(held)
        gathered_x = torch.cat(all_x)
        partial = torch.zeros((gathered_x.shape[0], hidden), dtype=torch.float32, device=x.device)
        if rows.numel():
            y = local_experts(gathered_x[rows], ids[rows, slots] - mine.start)
            partial.index_add_(0, rows, y.float() * torch.cat(all_w)[rows, slots, None])
        self.group.allreduce([partial], _reduce_op("SUM")).wait()
        return partial[self.rank * padded : self.rank * padded + num_tokens].to(x.dtype)

    def _probe_all_to_all(self) -> DispatchMode:
        """all_to_all on NCCL; on gloo only where this build implements it."""
        if self.device.type == "cuda":
            return "all_to_all"
        probe = torch.full((self.world_size,), float(self.rank))
        out = torch.empty_like(probe)
        try:
            self.group.alltoall_base(out, probe, [], []).wait()
        except RuntimeError:
            return "all_gather"
        if out.tolist() != [float(r) for r in range(self.world_size)]:
            return "all_gather"
        return "all_to_all"

