"""Iteration-level scheduling: each step decides which sequences run and how many tokens each
computes, under a token budget (chunked prefill mixed with decodes) and the free KV blocks.

Running sequences go first (oldest first); when blocks run out the newest running sequence is
preempted (its blocks freed, recomputed later: nothing is lost, since its tokens stay in
`token_ids`). Waiting sequences are admitted first-come first-served while budget and blocks
last. The output is a `SchedulerOutput`; the model runner turns it into tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
from workers.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)

    @property
    def num_running_tokens(self) -> int:
        return sum(s.num_tokens for s in self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq, num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.append_slots(seq, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                kept.append(seq)
                budget -= num_new
        kept.extend(queue)  # not reached this step (budget spent): still running
        self.running = kept

        # 2. Waiting sequences, first come first served; stop at the first that does not fit so
        # a large request is not starved by smaller ones behind it.
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if not bm.can_admit(seq, budget):
                    break
                self.waiting.popleft()
                bm.admit(seq)
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                bm.append_slots(seq, num_new)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished and free its blocks at once (running or waiting)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
