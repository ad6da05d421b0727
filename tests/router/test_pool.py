"""A pool's router without Ray: events in, load in, rankings out."""
from __future__ import annotations

from tandem.protocol.kv_events import BlocksRemoved, BlocksStored, KVEventBatch, Tier
from tandem.protocol.load import ReplicaLoad
from tandem.router.load import LoadTracker
from tandem.router.policy import RoutingConfig, RoutingRequest
from tandem.router.pool import PoolRouter
from tandem.protocol.prefix_hash import hash_full_blocks

BLOCK = 16
IDS = ["r0", "r1", "r2", "r3"]


def test_in_flight_ledger_counts_until_finished_or_reported():
    tracker = LoadTracker(in_flight_ttl_s=10.0)
    tracker.on_routed("q1", "r0", 1000, now=1.0)
    tracker.on_routed("q2", "r0", 500, now=2.0)
    assert tracker.outstanding_tokens("r0") == 1500
    tracker.on_finished("q1")
    assert tracker.outstanding_tokens("r0") == 500
    tracker.on_routed("q2", "r1", 500, now=2.5)  # a retry moves, it does not double count
    assert tracker.outstanding_tokens("r0") == 0 and tracker.outstanding_tokens("r1") == 500
    tracker.on_routed("q3", "r1", 100, now=4.0)
    tracker.update(ReplicaLoad("r1", 1, 0, 700, 0, 10, 20, 0.0), now=3.0)  # counts q2, not q3
    assert tracker.outstanding_tokens("r1") == 800
    tracker.expire(now=20.0)
    assert tracker.outstanding_tokens("r1") == 700


def test_shared_prefix_follows_the_replica_holding_it():
    pool = PoolRouter(RoutingConfig(block_size=BLOCK))
    document = list(range(1000, 1000 + 64 * BLOCK))
    chain = hash_full_blocks(document, BLOCK)
    pool.publish(KVEventBatch("r2", 0, [BlocksStored(chain, None)]))
    for i in range(5):
        tokens = document + [i] * 40
        ranked = pool.route(RoutingRequest(f"q{i}", hash_full_blocks(tokens, BLOCK), len(tokens)), IDS, now=float(i))
        assert ranked[0] == "r2"
        pool.request_finished(f"q{i}")


def test_hot_prefix_burst_spills_over_instead_of_piling_up():
    """Nothing finishes: the in-flight ledger alone must spread the burst."""
    pool = PoolRouter(RoutingConfig(block_size=BLOCK))
    document = list(range(64 * BLOCK))
    pool.publish(KVEventBatch("r0", 0, [BlocksStored(hash_full_blocks(document, BLOCK), None)]))
    chosen = []
    for i in range(40):
        tokens = document + [i] * 8
        chosen.append(pool.route(RoutingRequest(f"q{i}", hash_full_blocks(tokens, BLOCK), len(tokens)), IDS, now=0.0)[0])
    counts = {r: chosen.count(r) for r in IDS}
    assert chosen[:2] == ["r0"] * 2  # the cache wins while r0 is within balance_abs_tokens of the least
    assert all(counts[r] > 0 for r in IDS)
    assert counts["r0"] > max(counts[r] for r in IDS if r != "r0")  # and keeps the largest share
    loads = [pool.loads.outstanding_tokens(r) for r in IDS]
    assert max(loads) <= 1.2 * sum(loads) / len(loads) + len(document) + 8  # the guard's bound + one request


def test_route_ranks_every_candidate_once_and_tracks_a_changing_candidate_list():
    pool = PoolRouter(RoutingConfig(block_size=BLOCK))
    chain = hash_full_blocks(list(range(8 * BLOCK)), BLOCK)
    pool.publish(KVEventBatch("r3", 0, [BlocksStored(chain, None)]))
    ranked = pool.route(RoutingRequest("a", chain, 8 * BLOCK + 1), IDS, now=0.0)
    assert ranked[0] == "r3" and sorted(ranked) == IDS
    ranked = pool.route(RoutingRequest("b", chain, 8 * BLOCK + 1), ("r1", "r0"), now=0.0)  # r3 gone, a tuple
    assert sorted(ranked) == ["r0", "r1"]
    assert pool.route(RoutingRequest("c", chain, 8 * BLOCK + 1), IDS, now=0.0)[0] == "r3"


def test_removed_replicas_are_forgotten():
    pool = PoolRouter(RoutingConfig(block_size=BLOCK))
    chain = hash_full_blocks(list(range(4 * BLOCK)), BLOCK)
    pool.publish(KVEventBatch("r1", 0, [BlocksStored(chain, None)]))
    assert pool.match(chain) == {"r1": 4}
    pool.remove_replicas(["r1"])
    assert pool.match(chain) == {}


def test_host_tier_events_route_between_device_holders_and_misses():
    pool = PoolRouter(RoutingConfig(block_size=BLOCK))
    document = list(range(5000, 5000 + 32 * BLOCK))
    chain = hash_full_blocks(document, BLOCK)
    pool.publish(KVEventBatch("r1", 0, [BlocksStored(chain, None)]))
    # r3 held the document on its device, spilled its second half to the host tier, then lost it there.
    pool.publish(KVEventBatch("r3", 0, [BlocksStored(chain, None), BlocksStored(chain[16:], chain[15], Tier.HOST),
                                        BlocksRemoved(chain[16:])]))
    assert pool.index.match_tiers(chain) == ({"r1": 32, "r3": 32}, {"r3": 16})
    ranked = pool.route(RoutingRequest("q", hash_full_blocks(document + [1] * 5, BLOCK), len(document) + 5), IDS, now=0.0)
    assert ranked[:2] == ["r1", "r3"]
