"""Block manager invariants under random operation sequences (hypothesis state machines): no
block leaked or double freed after any sequence of allocate/append/fork/free/evict, with one
tier and with the host tier (copies out and back in flight, landing in any order, cancels)."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tandem.engine.block_manager import BlockManager
from tandem.engine.host_tier import HostTier
from tandem.protocol.kv_events import BlocksRemoved, BlocksStored
from tandem.protocol.prefix_hash import hash_full_blocks
from tandem.protocol.sampling_params import SamplingParams
from tandem.engine.sequence import Sequence

BLOCK = 4
NUM_BLOCKS = 24
# A small alphabet makes shared prefixes (cache hits) common.
tokens = st.lists(st.integers(0, 2), min_size=1, max_size=40)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK)
        self.live: list[Sequence] = []
        self.n = 0

    def _new_seq(self, token_ids: list[int]) -> Sequence:
        self.n += 1
        return Sequence(f"r{self.n}", token_ids, SamplingParams(max_tokens=8))

    @rule(token_ids=tokens)
    def allocate(self, token_ids):
        seq = self._new_seq(token_ids)
        if not self.bm.can_admit(seq, len(token_ids)):
            return
        hits = self.bm.admit(seq)
        assert hits % BLOCK == 0 and hits < len(token_ids)
        self.bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, new_tokens):
        seq = data.draw(st.sampled_from(self.live))
        if not self.bm.can_append(seq, len(new_tokens)):
            return
        self.bm.append_slots(seq, len(new_tokens))
        seq.token_ids.extend(new_tokens)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def fork(self, data, extra):
        parent = data.draw(st.sampled_from(self.live))
        child = self._new_seq(parent.token_ids + extra)
        self.bm.fork(parent, child)
        need = child.num_tokens - child.num_computed_tokens
        if not self.bm.can_append(child, need):
            self.bm.free(child)
            return
        self.bm.append_slots(child, need)
        child.num_computed_tokens = child.num_tokens
        self.bm.cache_full_blocks(child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @rule()
    def evict_all(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live)
        for seq in self.live:
            assert len(seq.block_ids) == self.bm.blocks_needed(seq.num_computed_tokens)
            assert len(set(seq.block_ids)) == len(seq.block_ids)
            # every hashed block of a live sequence is named by the real hash chain of its tokens
            assert seq.block_hashes == hash_full_blocks(seq.token_ids, BLOCK)[: len(seq.block_hashes)]
            for b, h in zip(seq.block_ids, seq.block_hashes):
                if self.bm.block_hash[b] is not None:
                    assert self.bm.block_hash[b] == h

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == NUM_BLOCKS


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_hit_reuses_blocks_and_lru_eviction():
    bm = BlockManager(8, BLOCK)
    a = Sequence("a", list(range(10)), SamplingParams())
    assert bm.admit(a) == 0
    bm.append_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    first_two = a.block_ids[:2]
    bm.free(a)
    b = Sequence("b", list(range(9)) + [99], SamplingParams())
    assert bm.admit(b) == 8 and b.block_ids == first_two  # freed but still cached
    bm.free(b)
    # Fill the pool with unrelated tokens: the cached blocks get evicted, with events.
    c = Sequence("c", [7] * 32, SamplingParams())
    bm.admit(c)
    bm.append_slots(c, 32)
    kinds = [type(e) for e in bm.drain_events()]
    assert kinds.count(BlocksStored) == 2 and kinds.count(BlocksRemoved) == 2
    d = Sequence("d", list(range(10)), SamplingParams())
    assert bm.match_prefix(d.token_ids) == ([], [])


# ------------------------------------------------------------------------------ two tiers
class GatedCopier:
    """A host-tier copier for bookkeeping tests: copies land only when the test says so, in any
    order. Block contents are modelled as the hash each block should hold, so a copy landing in
    a block that someone else owns by then shows up as a wrong content."""

    bytes_per_block = 64
    synchronous = False

    def __init__(self, device_content: dict[int, int]) -> None:
        self.device = device_content  # device block -> the block hash its KV is for
        self.host: dict[int, int] = {}  # host block -> the same
        self.pending: list[GatedCopy] = []

    def copy_out(self, device_ids, host_ids):
        return self._queue(lambda: self.host.update({h: self.device.get(d) for d, h in zip(device_ids, host_ids)}))

    def copy_in(self, host_ids, device_ids):
        return self._queue(lambda: self.device.update({d: self.host.get(h) for h, d in zip(host_ids, device_ids)}))

    def _queue(self, apply) -> "GatedCopy":
        copy = GatedCopy(apply)
        self.pending.append(copy)
        return copy

    def land(self, index: int) -> None:
        self.pending.pop(index % len(self.pending)).land()


class GatedCopy:
    def __init__(self, apply) -> None:
        self._apply, self._done = apply, False

    def land(self) -> None:
        self._apply()
        self._done = True

    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        assert self._done, "a test copier never lands by itself"

    def seconds(self) -> float:
        return 0.0


HOST_BLOCKS = 16
prompts = st.lists(st.integers(0, 2), min_size=BLOCK + 1, max_size=40)  # at least one full block


class TwoTierMachine(RuleBasedStateMachine):
    """The block manager with a host tier: blocks copied out at the eviction front, copied back
    for prefix hits, copies landing in any order, cancels while a copy is in flight. No device
    or host block may leak, be freed twice, or be handed out while a copy still writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK)
        self.content: dict[int, int] = {}
        self.copier = GatedCopier(self.content)
        self.host = HostTier(self.bm, self.copier, HOST_BLOCKS, lookahead_blocks=NUM_BLOCKS)
        self.live: list[Sequence] = []  # computed sequences
        self.loading: list[Sequence] = []  # waiting for a reload
        self.n = 0
        self.history: list[list[int]] = []  # every prompt allocated so far

    def _compute(self, seq: Sequence, first_block: int) -> None:
        """The sequence's tokens are computed: its full blocks from `first_block` hold their KV."""
        hashes = hash_full_blocks(seq.token_ids, BLOCK)
        seq.num_computed_tokens = seq.num_tokens
        for i in range(first_block, len(hashes)):
            self.content[seq.block_ids[i]] = hashes[i]
        self.bm.cache_full_blocks(seq)

    def _poll(self) -> None:
        for seq in self.host.poll():  # as `Scheduler` resumes them, then the rest is computed
            self.loading.remove(seq)
            seq.num_computed_tokens = len(seq.block_ids) * BLOCK
            self.bm.cache_full_blocks(seq)
            rest = seq.num_tokens - seq.num_computed_tokens
            if not self.bm.can_append(seq, rest):
                self.bm.free(seq)  # preempted
                continue
            first = seq.num_computed_tokens // BLOCK
            self.bm.append_slots(seq, rest)
            self._compute(seq, first)
            self.live.append(seq)

    @rule(token_ids=prompts)
    def allocate(self, token_ids):
        """One scheduling step with one new sequence: retire the copies that landed, admit (a
        host continuation waits for its reload, anything else is computed now), copy out the
        eviction front."""
        self._poll()
        self._admit(token_ids)
        self.host.offload(reserve=2)

    def _admit(self, token_ids: list[int]) -> None:
        self.history.append(list(token_ids))
        self.n += 1
        seq = Sequence(f"r{self.n}", token_ids, SamplingParams(max_tokens=8))
        device_ids, device_hashes = self.bm.match_prefix(seq.token_ids)
        host_ids = self.host.match(seq.token_ids, device_hashes)
        if host_ids:
            reload_tokens = len(host_ids) * BLOCK
            if not self.bm.can_admit(seq, reload_tokens):
                return
            self.bm.admit(seq)
            self.bm.append_slots(seq, reload_tokens)
            self.host.start_reload(seq, host_ids, seq.block_ids[len(device_ids):])
            self.loading.append(seq)
            return
        if not self.bm.can_admit(seq, len(token_ids)):
            return
        hits = self.bm.admit(seq)
        self.bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
        self._compute(seq, hits // BLOCK)
        self.live.append(seq)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=8))
    def revisit(self, data, extra):
        """A conversation's next turn: an earlier prompt (cut anywhere) plus new tokens."""
        earlier = data.draw(st.sampled_from(self.history))
        cut = data.draw(st.integers(min(len(earlier), BLOCK + 1), len(earlier)))
        self.allocate(earlier[:cut] + extra)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, new_tokens):
        seq = data.draw(st.sampled_from(self.live))
        if not self.bm.can_append(seq, len(new_tokens)):
            return
        first = seq.num_computed_tokens // BLOCK
        self.bm.append_slots(seq, len(new_tokens))
        seq.token_ids.extend(new_tokens)
        self._compute(seq, first)

    @precondition(lambda self: self.live or self.loading)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live + self.loading))
        if seq in self.loading:  # cancelled mid-reload, as Scheduler.finish does
            self.loading.remove(seq)
            self.host.cancel_reload(seq)
        else:
            self.live.remove(seq)
        self.bm.free(seq)

    @rule(reserve=st.integers(0, 8))
    def offload(self, reserve):
        before = self.bm.num_free_blocks
        self.host.offload(reserve)
        assert self.bm.num_free_blocks >= min(before, reserve)

    @precondition(lambda self: self.copier.pending)
    @rule(index=st.integers(0, 7), every=st.booleans(), then_poll=st.booleans())
    def land(self, index, every, then_poll):
        self.copier.land(index)
        while every and self.copier.pending:
            self.copier.land(0)
        if then_poll:
            self._poll()

    @rule(device_only=st.booleans())
    def evict(self, device_only):
        """Forget unheld cached blocks; `device_only`: the host tier keeps its copies, so the
        next matches of those prefixes are host-only hits."""
        if not device_only:
            self.host.reset()
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live + self.loading, self.host.device_pins())
        self.host.check_invariants()
        for seq in self.live:
            assert len(seq.block_ids) == self.bm.blocks_needed(seq.num_computed_tokens)
            hashes = hash_full_blocks(seq.token_ids, BLOCK)
            assert seq.block_hashes == hashes[: len(seq.block_hashes)]
            for i in range(seq.num_computed_tokens // BLOCK):  # every computed block holds its KV
                assert self.content.get(seq.block_ids[i]) == hashes[i], f"{seq.request_id} block {i} corrupted"
        for seq in self.loading:
            assert len(set(seq.block_ids)) == len(seq.block_ids)
        for h, hb in self.host._ready.items():  # a loadable host block holds what it claims
            assert self.copier.host.get(hb) == h

    def teardown(self):
        for seq in self.live + self.loading:
            if seq in self.loading:
                self.host.cancel_reload(seq)
            self.bm.free(seq)
        while self.copier.pending:
            self.copier.land(0)
        assert self.host.poll() == []
        self.bm.check_invariants([], [])
        self.host.check_invariants()
        assert self.bm.num_free_blocks == NUM_BLOCKS and not self.host.busy
        assert all(p == 0 for p in self.host.pins)


TestTwoTiers = TwoTierMachine.TestCase
TestTwoTiers.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
