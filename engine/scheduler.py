"""Iteration-level scheduling: each step decides which sequences run and how many tokens each
computes, under a token budget (chunked prefill mixed with decodes) and the free KV blocks.

Running sequences go first (oldest first); when blocks run out the newest running sequence is
preempted (its blocks freed, recomputed later: nothing is lost, since its tokens stay in
`token_ids`). Waiting sequences are admitted in queue order while budget and blocks last: arrival
order ("fcfs"), or longest requested output first ("lof", for offline batches). The output is a
`SchedulerOutput`; the model runner turns it into tensors.

A sequence whose prompt KV the engine's `KVConnector` loads from another worker holds blocks
for its whole prompt and waits for KV (`waiting_for_kv`), off the batch, until `resume_loaded`.
Likewise a sequence whose prefix continues in the host tier (`engine/host_tier.py`) gets device
blocks for that part and waits off the batch (`loading_from_host`) while the host tier copies
it back; each `schedule` first moves the sequences whose copy landed into the running batch,
and ends by letting the host tier copy out the blocks next in line for eviction.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import SCHEDULING_POLICIES
from tandem.engine.host_tier import HostTier
from tandem.engine.kv_connector import KVConnector
from tandem.engine.sequence import Sequence, SequenceStatus


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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", long_prefill_token_threshold: int = 0,
                 kv_connector: KVConnector | None = None, host_tier: HostTier | None = None) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}")
        if long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        # > 0: no sequence computes more than this many tokens in one step (EngineConfig).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.block_manager = block_manager
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.kv_connector = kv_connector or KVConnector()
        self.waiting_for_kv: list[Sequence] = []
        self.host_tier = host_tier
        self.loading_from_host: list[Sequence] = []  # prefix being copied back from the host tier

    def add(self, seq: Sequence) -> None:
        if self.policy == "lof":
            # Before the first fresh waiting sequence with fewer tokens left to generate (ties
            # keep arrival order; preempted ones stay ahead). Linear in the waiting queue.
            wanted = seq.max_num_tokens - seq.num_tokens
            for i, other in enumerate(self.waiting):
                if other.num_preemptions == 0 and other.max_num_tokens - other.num_tokens < wanted:
                    self.waiting.insert(i, seq)
                    return
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
        if self.host_tier is not None:
            self._resume_reloaded()

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.num_tokens >= seq.max_num_tokens:
                # Its last token is still on the device (overlap scheduling) and is its final
                # one: it finishes when that token is read, so computing more would be waste.
                kept.append(seq)
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, self._chunk_cap(budget))
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
            while self.waiting and budget > 0 and len(self.running) + len(self.loading_from_host) < self.max_num_seqs:
                seq = self.waiting[0]
                if self.kv_connector.loads and self._admit_for_load(seq):
                    continue
                if self.host_tier is not None:
                    reloading = self._admit_from_host(seq)
                    if reloading is None:
                        break  # its prefix is in the host tier but its blocks do not fit yet
                    if reloading:
                        continue
                if not bm.can_admit(seq, self._chunk_cap(budget)):
                    break
                self.waiting.popleft()
                bm.admit(seq)
                num_new = min(seq.num_tokens - seq.num_computed_tokens, self._chunk_cap(budget))
                bm.append_slots(seq, num_new)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        if self.host_tier is not None and out.scheduled:
            # Copy out what the next allocations will evict, sparing what the next step may need
            # (beside a step: an idle engine evicts nothing).
            self.host_tier.offload(reserve=bm.blocks_needed(self.max_num_batched_tokens) + len(self.running))
        return out

    def _chunk_cap(self, budget: int) -> int:
        """The most tokens one sequence may compute this step, with `budget` left."""
        cap = self.long_prefill_token_threshold
        return min(budget, cap) if cap > 0 else budget

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
        seq.drop_pending()  # tokens sampled for a step after its end are never reported
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.waiting_for_kv:
            self.waiting_for_kv.remove(seq)
            self.kv_connector.cancel_load(seq)  # before the free: no KV may land after it
        elif seq in self.loading_from_host:
            self.loading_from_host.remove(seq)
            self.host_tier.cancel_reload(seq)  # before the free: its blocks stay pinned until the copy lands
        self.block_manager.free(seq)

    # ---------------------------------------------------------- KV from elsewhere
    def _admit_for_load(self, seq: Sequence) -> bool:
        """Admit `seq` to wait for KV if the connector wants to load it and its whole prompt
        fits: prefix hits attached, blocks allocated for the rest, then the load starts."""
        bm = self.block_manager
        if len(self.running) + len(self.waiting_for_kv) >= self.max_num_seqs:
            return False
        hit_ids, _ = bm.match_prefix(seq.token_ids)
        uncached = seq.num_tokens - len(hit_ids) * bm.block_size
        if not self.kv_connector.wants_load(seq, uncached) or not bm.can_admit(seq, seq.num_tokens):
            return False
        self.waiting.popleft()
        bm.admit(seq)
        bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        seq.status = SequenceStatus.RUNNING
        self.waiting_for_kv.append(seq)
        self.kv_connector.start_load(seq)
        return True

    def resume_loaded(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Move a sequence that waited for KV into the running batch. `num_computed_tokens`: the
        prompt length when its KV arrived, or its prefix hits when the rest is recomputed here."""
        self.waiting_for_kv.remove(seq)
        seq.num_computed_tokens = num_computed_tokens
        self.running.append(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a running sequence off the batch, keeping its blocks (a save in flight reads
        them); `finish` frees them later."""
        self.running.remove(seq)

    # ------------------------------------------------------------ the host tier
    def _admit_from_host(self, seq: Sequence) -> bool | None:
        """If `seq`'s prefix continues in the host tier after its device hits, admit it to wait
        for that part to be copied back: device hits attached, device blocks allocated for the
        host part, the copy started. False: no host hit; None: a hit that does not fit now."""
        bm, host = self.block_manager, self.host_tier
        if not host.num_ready_blocks:
            return False
        device_ids, device_hashes = bm.match_prefix(seq.token_ids)
        host_ids = host.match(seq.token_ids, device_hashes)
        if not host_ids:
            return False
        reload_tokens = len(host_ids) * bm.block_size
        if not bm.can_admit(seq, reload_tokens):
            return None
        self.waiting.popleft()
        bm.admit(seq)
        bm.append_slots(seq, reload_tokens)
        host.start_reload(seq, host_ids, seq.block_ids[len(device_ids):])
        if seq.num_preemptions == 0:
            seq.num_cached_tokens += reload_tokens
        seq.status = SequenceStatus.RUNNING
        self.loading_from_host.append(seq)
        return True

    def _resume_reloaded(self) -> None:
        """Sequences whose host-tier copy landed join the running batch, those blocks computed
        (and now cached on the device too)."""
        bm = self.block_manager
        for seq in self.host_tier.poll():
            self.loading_from_host.remove(seq)
            seq.num_computed_tokens = len(seq.block_ids) * bm.block_size
            bm.cache_full_blocks(seq)
            self.running.append(seq)
