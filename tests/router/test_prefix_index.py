"""The prefix index against a brute-force model: per replica, the set of block hashes it holds.

A replica can reuse a request's first n blocks iff it holds every one of them, so the model's
answer for a chain is, per replica, the count of leading chain blocks in its set. Workers are
simulated the way a real prefix cache behaves: a request caches every missing block of its
prefix, in chain order (one `BlocksStored` per run of missing blocks, parented on the block
before it); eviction removes any subset; a restart clears everything. With two tiers the model
holds a set per tier, and a replica's match is its device blocks from the start of the chain,
then its host blocks continuing it.
"""
from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.protocol.kv_events import (AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch, Tier,
                                       decode_batch, encode_batch)
from tandem.router.prefix_index import PrefixIndex
from tandem.protocol.prefix_hash import hash_full_blocks

BLOCK_SIZE = 2
REPLICAS = ["r0", "r1", "r2"]


def model_match(held: dict[str, set[int]], chain: list[int]) -> dict[str, int]:
    result = {}
    for replica_id, blocks in held.items():
        n = 0
        while n < len(chain) and chain[n] in blocks:
            n += 1
        if n:
            result[replica_id] = n
    return result


def store_events(replica_id: str, held: set[int], chain: list[int]) -> list[BlocksStored]:
    """What a worker publishes when a request caches all of `chain`."""
    events, run_start = [], None
    for i, block_hash in enumerate(chain + [None]):
        missing = block_hash is not None and block_hash not in held
        if missing and run_start is None:
            run_start = i
        elif not missing and run_start is not None:
            parent = chain[run_start - 1] if run_start > 0 else None
            events.append(BlocksStored(chain[run_start:i], parent))
            run_start = None
    return events


# Token sequences over a two-letter alphabet share prefixes (and diverge mid-run) often.
worlds = st.lists(st.lists(st.integers(0, 1), min_size=0, max_size=14), min_size=1, max_size=6)
operations = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "store", "remove", "clear"]),
        st.sampled_from(REPLICAS),
        st.integers(0, 5),  # which sequence
        st.integers(0, 7),  # how many of its blocks
        st.randoms(use_true_random=False),
    ),
    max_size=40,
)


def run_world(index: PrefixIndex, world: list[list[int]], ops, check) -> None:
    chains = [hash_full_blocks(tokens, BLOCK_SIZE) for tokens in world]
    held: dict[str, set[int]] = {r: set() for r in REPLICAS}
    for kind, replica_id, seq_index, num_blocks, rng in ops:
        chain = chains[seq_index % len(chains)][:num_blocks]
        if kind == "store":
            for event in store_events(replica_id, held[replica_id], chain):
                index.apply(replica_id, event)
            held[replica_id].update(chain)
        elif kind == "remove":
            gone = [h for h in chain if h in held[replica_id] and rng.random() < 0.5]
            rng.shuffle(gone)  # evictions come in any order
            index.apply(replica_id, BlocksRemoved(gone))
            held[replica_id].difference_update(gone)
        else:
            index.apply(replica_id, AllBlocksCleared())
            held[replica_id].clear()
        index.check_invariants()
        for full_chain in chains:
            for length in {len(full_chain), len(full_chain) // 2}:
                check(index.match(full_chain[:length]), model_match(held, full_chain[:length]))


@settings(max_examples=300, deadline=None)
@given(worlds, operations)
def test_match_equals_model_without_memory_pressure(world, ops):
    index = PrefixIndex(max_blocks=10_000)

    def check(got, want):
        assert got == want

    run_world(index, world, ops, check)


@settings(max_examples=300, deadline=None)
@given(worlds, operations, st.integers(1, 12))
def test_bounded_index_stays_bounded_and_never_overclaims(world, ops, max_blocks):
    index = PrefixIndex(max_blocks=max_blocks)

    def check(got, want):
        assert index.num_blocks <= max_blocks
        assert index.num_nodes <= index.num_blocks
        for replica_id, n in got.items():
            assert 0 < n <= want.get(replica_id, 0)

    run_world(index, world, ops, check)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["stored", "removed", "cleared", "evict"]),
            st.sampled_from(REPLICAS),
            st.lists(st.integers(1, 12), max_size=6),
            st.one_of(st.none(), st.integers(0, 12)),
        ),
        max_size=50,
    )
)
def test_malformed_event_streams_keep_the_tree_sound(events):
    """Peers can send nonsense (repeated hashes, unknown parents, aliasing): never corrupt."""
    index = PrefixIndex(max_blocks=8)
    for kind, replica_id, hashes, parent in events:
        if kind == "stored":
            index.apply(replica_id, BlocksStored(hashes, parent))
        elif kind == "removed":
            index.apply(replica_id, BlocksRemoved(hashes))
        elif kind == "cleared":
            index.apply(replica_id, AllBlocksCleared())
        else:
            before = index.num_blocks
            evicted = index.evict(len(hashes))
            assert evicted >= min(len(hashes), before)
            assert index.num_blocks == before - evicted
        index.check_invariants()
        index.match(hashes)


def test_one_walk_reports_every_replica_on_a_shared_prefix():
    system = list(range(32))
    chain_a = hash_full_blocks(system + [100] * 16, 8)  # 6 blocks, 4 shared
    chain_b = hash_full_blocks(system + [200] * 16, 8)
    index = PrefixIndex()
    index.insert("a", chain_a)
    index.insert("b", chain_b[4:], parent_hash=chain_b[3])  # b's parent known via a
    index.insert("b", chain_b[:4])  # and now b holds the shared prefix too
    index.check_invariants()
    assert index.match(chain_a) == {"a": 6, "b": 4}
    assert index.match(chain_b) == {"a": 4, "b": 6}
    assert index.match(chain_a, candidates=["b"]) == {"b": 4}
    assert index.match(hash_full_blocks([7] * 16, 8)) == {}
    # One run per divergence: root -> shared(4) -> {a-tail, b-tail}.
    assert index.num_nodes == 3


def test_lru_eviction_drops_the_least_recently_matched_leaf():
    chains = [hash_full_blocks([k] * 40, 8) for k in range(3)]  # 5 blocks each, no sharing
    index = PrefixIndex(max_blocks=12, evict_to_fraction=0.9)
    index.insert("r", chains[0])
    index.insert("r", chains[1])
    assert index.match(chains[0]) == {"r": 5}  # chain 0 is now more recent than chain 1
    index.insert("r", chains[2])  # 15 blocks > 12: evict down to 10
    index.check_invariants()
    assert index.num_blocks == 10
    assert index.match(chains[0]) == {"r": 5}
    assert index.match(chains[1]) == {}
    assert index.match(chains[2]) == {"r": 5}
    assert index.num_evicted_blocks == 5


def test_stored_blocks_under_an_unknown_parent_are_dropped():
    chain = hash_full_blocks(list(range(24)), 8)
    index = PrefixIndex()
    index.insert("r", chain[1:], parent_hash=chain[0])
    assert index.num_blocks == 0 and index.num_dropped_blocks == 2
    assert index.match(chain) == {}


def test_sequence_gap_or_restart_drops_that_replicas_view():
    chain = hash_full_blocks(list(range(32)), 8)
    index = PrefixIndex()
    index.apply_batch(KVEventBatch("a", 0, [BlocksStored(chain, None)]))
    index.apply_batch(KVEventBatch("b", 0, [BlocksStored(chain[:2], None)]))
    index.apply_batch(KVEventBatch("a", 1, [BlocksRemoved(chain[3:])]))
    assert index.match(chain) == {"a": 3, "b": 2}
    # Batch 2 from "a" was lost: its view is gone, batch 3 applies on an empty view.
    index.apply_batch(KVEventBatch("a", 3, [BlocksStored(chain[2:3], chain[1])]))
    assert index.match(chain) == {"b": 2}
    assert index.num_view_drops == 1
    # "b" restarts its publisher (seq back to 0).
    index.apply_batch(KVEventBatch("b", 0, [BlocksStored(chain[:1], None)]))
    assert index.match(chain) == {"b": 1}
    assert index.num_view_drops == 2


def test_remove_replica_forgets_it_and_keeps_runs_maximal():
    rng = random.Random(0)
    chains = [hash_full_blocks([rng.randrange(3) for _ in range(64)], 4) for _ in range(20)]
    index = PrefixIndex()
    for i, chain in enumerate(chains):
        index.insert("ab"[i % 2], chain)
    index.remove_replica("a")
    index.check_invariants()
    assert index.replicas() == {"b"}
    for i, chain in enumerate(chains):
        if i % 2:
            assert index.match(chain) == {"b": len(chain)}
    # Evicting (almost) everything must reach interior nodes once their children are gone.
    total = index.num_blocks
    assert index.evict(total - 1) >= total - 1
    index.check_invariants()


def test_eviction_reaches_a_parent_once_its_children_are_gone():
    shared = list(range(16))
    chain_1 = hash_full_blocks(shared + [1] * 16, 4)
    chain_2 = hash_full_blocks(shared + [2] * 16, 4)
    index = PrefixIndex()
    index.insert("b", chain_1)
    index.insert("c", chain_2)
    index.insert("c", chain_1[4:], parent_hash=chain_1[3])  # tree: P{b,c} -> L1{b,c}, L2{c}
    index.remove("c", chain_1[:4])  # P{b}: an interior node that still holds blocks
    assert index.match(chain_1) == {"b": 8}
    assert index.num_nodes == 3
    assert index.evict(11) == 12
    assert index.num_blocks == 0 and index.num_nodes == 0


# ------------------------------------------------------------------------------ two tiers
def model_match_tiers(held: dict[str, dict[Tier, set[int]]], chain: list[int]) -> tuple[dict, dict]:
    """What a replica's engine can reuse: device blocks from the start, then host blocks."""
    matched, host = {}, {}
    for replica_id, tiers in held.items():
        n = 0
        while n < len(chain) and chain[n] in tiers[Tier.GPU]:
            n += 1
        device = n
        while n < len(chain) and chain[n] in tiers[Tier.HOST]:
            n += 1
        if n:
            matched[replica_id] = n
        if n > device:
            host[replica_id] = n - device
    return matched, host


tiered_operations = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "store", "remove", "clear"]),
        st.sampled_from(REPLICAS),
        st.integers(0, 5),
        st.integers(0, 7),
        st.randoms(use_true_random=False),
        st.sampled_from([Tier.GPU, Tier.HOST]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(worlds, tiered_operations)
def test_match_tiers_equals_two_tier_model(world, ops):
    index = PrefixIndex(max_blocks=10_000)
    chains = [hash_full_blocks(tokens, BLOCK_SIZE) for tokens in world]
    held = {r: {Tier.GPU: set(), Tier.HOST: set()} for r in REPLICAS}
    for kind, replica_id, seq_index, num_blocks, rng, tier in ops:
        chain = chains[seq_index % len(chains)][:num_blocks]
        if kind == "store":
            for event in store_events(replica_id, held[replica_id][tier], chain):
                index.apply(replica_id, BlocksStored(event.block_hashes, event.parent_hash, tier))
            held[replica_id][tier].update(chain)
        elif kind == "remove":
            gone = [h for h in chain if h in held[replica_id][tier] and rng.random() < 0.5]
            rng.shuffle(gone)
            index.apply(replica_id, BlocksRemoved(gone, tier))
            held[replica_id][tier].difference_update(gone)
        else:
            index.apply(replica_id, AllBlocksCleared())
            for blocks in held[replica_id].values():
                blocks.clear()
        index.check_invariants()
        for full_chain in chains:
            for length in {len(full_chain), len(full_chain) // 2}:
                got = index.match_tiers(full_chain[:length])
                assert got == model_match_tiers(held, full_chain[:length])
                assert index.match(full_chain[:length], ["r0", "r2"]) == {
                    r: n for r, n in got[0].items() if r in ("r0", "r2")}
        assert index.replicas() == {r for r, tiers in held.items() if tiers[Tier.GPU] or tiers[Tier.HOST]}


def test_host_events_round_trip_and_old_gpu_wire_form():
    batch = KVEventBatch("r", 1, [BlocksStored([5, 6], 4, Tier.HOST), BlocksRemoved([5], Tier.HOST),
                                  BlocksStored([7], None), BlocksRemoved([7])], 1.0)
    assert decode_batch(encode_batch(batch)) == batch
    # A GPU event is written as before tiers existed, so an older peer reads it unchanged.
    old_form = msgpack.unpackb(encode_batch(KVEventBatch("r", 1, [BlocksStored([7], None), BlocksRemoved([7])])))
    assert old_form[3] == [["stored", [7], None], ["removed", [7]]]
    for bad in (["stored", [1], None, "disk"], ["removed", [1], 3], ["stored", [1], None, "host", 1]):
        with pytest.raises(ValueError):
            decode_batch(msgpack.packb(["r", 0, 0.0, [bad]]))
