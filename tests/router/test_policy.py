from __future__ import annotations

import pytest

from tandem.router.policy import CandidateState, RoutingConfig, RoutingPolicy, RoutingRequest

IDS = ["r0", "r1", "r2"]


def request(num_prompt_tokens: int = 256, session_id: str | None = None) -> RoutingRequest:
    return RoutingRequest("req", [], num_prompt_tokens, session_id)


def states(matched=(0, 0, 0), outstanding=(0, 0, 0), kv=(0.0, 0.0, 0.0)) -> list[CandidateState]:
    return [CandidateState(r, m, o, k) for r, m, o, k in zip(IDS, matched, outstanding, kv)]


def test_prefix_wins_when_load_is_even():
    policy = RoutingPolicy(RoutingConfig(block_size=16))
    ranked = policy.rank(request(256), states(matched=(2, 12, 4), outstanding=(3000, 3000, 3000)))
    assert ranked == ["r1", "r2", "r0"]


def test_prefix_outweighs_a_moderate_load_difference():
    policy = RoutingPolicy(RoutingConfig(block_size=16))
    # r1 holds the whole 4k prompt but runs 2k more tokens than r0: still worth it.
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(10000, 12000, 10000)))
    assert ranked[0] == "r1"


def test_cost_is_in_tokens_a_cached_token_worth_prefix_weight():
    policy = RoutingPolicy(RoutingConfig(block_size=16, prefix_weight=1.0, kv_weight=0.0, balance_rel=10.0))
    # 1024 cached tokens are worth 1024 tokens of queue: 1000 more wins, 1100 more loses.
    assert policy.rank(request(2048), states(matched=(0, 64, 0), outstanding=(20000, 21000, 20000)))[0] == "r1"
    assert policy.rank(request(2048), states(matched=(0, 64, 0), outstanding=(20000, 21100, 20000)))[0] != "r1"


def test_balance_guard_skips_replicas_far_above_the_mean():
    config = RoutingConfig(block_size=16, prefix_weight=100.0, balance_abs_tokens=2048, balance_rel=1.2)
    policy = RoutingPolicy(config)
    # The prefix weight makes r1 win on cost, but it is above 1.2x the mean and 2k over the least.
    ranked = policy.rank(request(4096), states(matched=(256, 256, 0), outstanding=(10000, 16000, 9000)))
    assert ranked == ["r0", "r2", "r1"]  # the guarded one goes last; the others by cost
    # Within the bound the prefix keeps it.
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(10000, 12500, 9000)))
    assert ranked[0] == "r1"
    # On a near-idle pool the absolute bound keeps the relative one from thrashing.
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(0, 2000, 0)))
    assert ranked[0] == "r1"


def test_least_kv_use_breaks_even_load():
    policy = RoutingPolicy(RoutingConfig())
    assert policy.rank(request(), states(kv=(0.9, 0.2, 0.5)))[0] == "r1"


def test_idle_ties_rotate_instead_of_piling_onto_one_replica():
    policy = RoutingPolicy(RoutingConfig())
    firsts = [policy.rank(request(), states())[0] for _ in range(6)]
    assert firsts == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_session_counts_as_a_cached_prefix_before_its_events_arrive():
    policy = RoutingPolicy(RoutingConfig(block_size=16))
    first = policy.rank(request(1024, "conv-1"), states(matched=(0, 0, 8)))[0]
    assert first == "r2" and policy.session_replica("conv-1") == "r2"
    # The next turn: the index has not heard of r2's blocks yet, r0 holds a shorter shared
    # prefix, r2 is modestly busier; the session's last prompt (1024 tokens) counts as cached.
    assert policy.rank(request(1200, "conv-1"), states(matched=(32, 0, 0), outstanding=(0, 0, 1500)))[0] == "r2"
    # Its replica leaves the candidates: the session moves, and remembers where.
    moved = policy.rank(request(1300, "conv-1"), states(matched=(12, 0, 0))[:2])[0]
    assert moved == "r0" and policy.session_replica("conv-1") == "r0"
    # Its replica is far above the mean: the guard moves it to the least loaded.
    assert policy.rank(request(1400, "conv-1"), states(outstanding=(50_000, 100, 3000)))[0] == "r1"
    assert policy.session_replica("conv-1") == "r1"


def test_rank_lists_matches_rank_and_takes_a_sparse_match():
    ids, outstanding, kv = ["a", "b", "c", "d"], [4000, 3000, 5000, 3000], [0.1, 0.2, 0.1, 0.2]
    dense, sparse = RoutingPolicy(RoutingConfig()), RoutingPolicy(RoutingConfig())
    for matched in ([0, 0, 40, 0], [10, 0, 0, 3], [0, 0, 0, 0]):
        expected = dense.rank_lists(request(800), ids, matched, outstanding, kv)
        assert sparse.rank_lists(request(800), ids, {i: m for i, m in enumerate(matched) if m}, outstanding, kv) == expected


def test_session_map_is_bounded_lru():
    policy = RoutingPolicy(RoutingConfig(max_sessions=2))
    for session_id in ["a", "b", "a", "c"]:
        policy.rank(request(session_id=session_id), states())
    assert policy.session_replica("b") is None
    assert policy.session_replica("a") is not None and policy.session_replica("c") is not None


def test_round_robin_cycles_and_ignores_prefix():
    policy = RoutingPolicy(RoutingConfig(policy="round_robin"))
    rankings = [policy.rank(request(), states(matched=(0, 16, 0))) for _ in range(4)]
    assert [r[0] for r in rankings] == ["r0", "r1", "r2", "r0"]
    assert rankings[1] == ["r1", "r2", "r0"]


def test_least_loaded_and_random():
    least = RoutingPolicy(RoutingConfig(policy="least_loaded"))
    assert least.rank(request(), states(matched=(16, 0, 0), outstanding=(500, 900, 100))) == ["r2", "r0", "r1"]
    draws = [RoutingPolicy(RoutingConfig(policy="random", seed=7)) for _ in range(2)]
    sequences = [[p.rank(request(), states())[0] for _ in range(20)] for p in draws]
    assert sequences[0] == sequences[1]  # deterministic given the seed
    assert set(sequences[0]) == set(IDS)


def test_config_is_validated_and_frozen():
    with pytest.raises(ValueError):
        RoutingConfig(policy="fastest")
    with pytest.raises(ValueError):
        RoutingConfig(balance_rel=0.5)
    config = RoutingConfig()
    with pytest.raises(AttributeError):
        config.policy = "random"  # type: ignore[misc]


def test_a_host_tier_hit_ranks_between_a_device_hit_and_a_miss():
    policy = RoutingPolicy(RoutingConfig(block_size=16))
    # r0 holds the 64-block prefix on its device, r1 in its host tier, r2 not at all.
    candidates = [CandidateState("r0", 64, 1000), CandidateState("r1", 64, 1000, host_blocks=64),
                  CandidateState("r2", 0, 1000)]
    for _ in range(3):  # whatever the tie rotation
        assert policy.rank(request(2048), candidates) == ["r0", "r1", "r2"]


def test_a_host_block_is_worth_host_hit_weight_of_a_device_block():
    config = RoutingConfig(block_size=16, prefix_weight=1.0, kv_weight=0.0, balance_rel=10.0, host_hit_weight=0.5)
    policy = RoutingPolicy(config)
    # r1: 32 device blocks + 32 host blocks = 512 + 0.5 * 512 = 768 tokens of queue.
    def first(extra):
        return policy.rank(request(2048), [CandidateState("r0", 0, 20000),
                                           CandidateState("r1", 64, 20000 + extra, host_blocks=32)])[0]
    assert first(760) == "r1" and first(776) == "r0"
    # Only the usable part counts: with a 40-block prompt, 39 blocks are usable (32 device + 7 host).
    short = policy.rank(RoutingRequest("q", [], 40 * 16), [CandidateState("r0", 0, 20000),
                                                         CandidateState("r1", 64, 20000 + 512 + 56 - 4, host_blocks=32)])
    assert short[0] == "r1"
    with pytest.raises(ValueError):
        RoutingConfig(host_hit_weight=1.5)
