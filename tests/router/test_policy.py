from __future__ import annotations

import pytest

from router.policy import CandidateState, RoutingConfig, RoutingPolicy, RoutingRequest

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
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(1000, 3000, 1000)))
    assert ranked[0] == "r1"


def test_balance_guard_falls_back_to_least_loaded():
    config = RoutingConfig(block_size=16, prefix_weight=10.0, balance_abs_tokens=8192, balance_rel=1.5)
    policy = RoutingPolicy(config)
    # The prefix weight makes r1 win on score, but it is 20k tokens busier than r2.
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(9000, 25000, 5000)))
    assert ranked == ["r2", "r0", "r1"]
    # Within the threshold, the prefix keeps it.
    ranked = policy.rank(request(4096), states(matched=(0, 256, 0), outstanding=(9000, 12000, 5000)))
    assert ranked[0] == "r1"


def test_least_kv_use_breaks_even_load():
    policy = RoutingPolicy(RoutingConfig())
    assert policy.rank(request(), states(kv=(0.9, 0.2, 0.5)))[0] == "r1"


def test_idle_ties_rotate_instead_of_piling_onto_one_replica():
    policy = RoutingPolicy(RoutingConfig())
    firsts = [policy.rank(request(), states())[0] for _ in range(6)]
    assert firsts == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_session_sticks_while_healthy_and_not_overloaded():
    policy = RoutingPolicy(RoutingConfig(block_size=16))
    first = policy.rank(request(256, "conv-1"), states(matched=(0, 0, 8)))[0]
    assert first == "r2"
    # Another replica now has a longer match, load is modest: the session stays.
    assert policy.rank(request(256, "conv-1"), states(matched=(12, 0, 0), outstanding=(0, 0, 2000)))[0] == "r2"
    # Its replica leaves the candidates: the session moves, and remembers where.
    moved = policy.rank(request(256, "conv-1"), states(matched=(12, 0, 0))[:2])[0]
    assert moved == "r0" and policy.session_replica("conv-1") == "r0"
    # Its replica is overloaded: the guard moves it to the least loaded.
    assert policy.rank(request(256, "conv-1"), states(outstanding=(50_000, 100, 3000)))[0] == "r1"
    assert policy.session_replica("conv-1") == "r1"


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
