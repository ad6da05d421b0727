"""Block manager invariants under random operation sequences (hypothesis state machine): no
block leaked or double freed after any sequence of allocate/append/fork/free/evict."""
from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tandem.engine.block_manager import BlockManager
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
