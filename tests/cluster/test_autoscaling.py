"""The pools' autoscaling policies over hand-built Serve `AutoscalingContext`s: each decision
(up, hold, down, in-flight floor, partial reports, bounds, fallback), the hysteresis band,
and Serve's own delay logic wrapped around them (what the controller runs)."""
from __future__ import annotations

import pytest
from ray.serve._private.common import TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from tandem.workers.autoscaling import (STAT_KEYS, DecodePolicy, DecodeTargets, PrefillPolicy, PrefillTargets,
                                 decide, decode_decision, pool_autoscaling_config, prefill_decision)

PREFILL = PrefillTargets(target_queued_tokens_per_replica=1000, max_running_per_replica=10,
                         downscale_utilization=0.6)
DECODE = DecodeTargets(target_kv_usage=0.5, target_running_per_replica=10, max_kv_usage=0.9,
                       max_running_per_replica=20, downscale_utilization=0.6)


def stats(queued_prefill_tokens=0.0, num_running=0.0, num_waiting=0.0, kv_usage=0.0) -> dict[str, float]:
    return {"queued_prefill_tokens": float(queued_prefill_tokens), "num_running": float(num_running),
            "num_waiting": float(num_waiting), "kv_usage": float(kv_usage)}


def context(per_replica: list[dict[str, float] | None], *, latest: list[dict[str, float] | None] | None = None,
            num_replicas: int | None = None, target: int | None = None, total_num_requests: float = 0.0,
            min_replicas: int = 1, max_replicas: int = 16, policy_state: dict | None = None,
            config: AutoscalingConfig | None = None) -> AutoscalingContext:
    """`per_replica[i]`: replica i's averaged stats (None: it has not reported); `latest`: the
    newest raw point per replica (default: the averaged values)."""
    replicas = [f"replica-{i}" for i in range(len(per_replica) if num_replicas is None else num_replicas)]
    aggregated: dict[str, dict[str, float]] = {}
    raw: dict[str, dict[str, list]] = {}
    latest = per_replica if latest is None else latest
    for replica, averaged, newest in zip(replicas, per_replica, latest):
        for key in STAT_KEYS:
            if averaged is not None:
                aggregated.setdefault(key, {})[replica] = averaged[key]
            if newest is not None:
                raw.setdefault(key, {})[replica] = [TimeStampedValue(1.0, 0.0), TimeStampedValue(2.0, newest[key])]
    return AutoscalingContext(
        deployment_id=None, deployment_name="DecodeWorker", app_name="tandem",
        current_num_replicas=len(replicas), target_num_replicas=len(replicas) if target is None else target,
        running_replicas=replicas, total_num_requests=total_num_requests, total_queued_requests=0.0,
        aggregated_metrics=aggregated, raw_metrics=raw,
        capacity_adjusted_min_replicas=min_replicas, capacity_adjusted_max_replicas=max_replicas,
        policy_state=dict(policy_state or {}), last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=config or AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas),
    )


# ------------------------------------------------------------------------------ decide itself

def test_decide_up_hold_down_and_floor():
    assert decide(2, 2.01, 0, 0.6, 1, 8) == 3  # more than 2 replicas' worth: up
    assert decide(2, 1.5, 0, 0.6, 1, 8) == 2  # 1.5/0.6 = 2.5 -> 3 > 2: inside the band, hold
    assert decide(2, 1.2, 0, 0.6, 1, 8) == 2  # 1.2/0.6 = 2 exactly: still 2
    assert decide(4, 1.2, 0, 0.6, 1, 8) == 2  # down to the count that runs at <= 60% of target
    assert decide(4, 0.0, 3, 0.6, 1, 8) == 3  # the in-flight floor wins over an idle average
    assert decide(4, 0.1, 0, 0.6, 1, 8, complete=False) == 4  # a replica missing: no scale-down
    assert decide(4, 6.0, 0, 0.6, 1, 8, complete=False) == 6  # ... but scale-up still goes
    assert decide(4, 20.0, 0, 0.6, 1, 8) == 8 and decide(4, 0.0, 0, 0.6, 2, 8) == 2  # bounds


# --------------------------------------------------------------------------------- prefill

def test_prefill_scales_up_on_queued_tokens():
    ctx = context([stats(queued_prefill_tokens=1500), stats(queued_prefill_tokens=1200)])
    replicas, state = prefill_decision(ctx, PREFILL)
    assert replicas == 3  # 2700 tokens / 1000 per replica
    assert state["tandem"]["source"] == "engine_stats"


def test_prefill_hysteresis_band_holds_both_counts():
    # 700 queued tokens in all = 0.7 replicas' worth: one replica keeps it, two keep it too
    # (one replica would run at 70% > 60%), so a load near the target does not flap.
    assert prefill_decision(context([stats(queued_prefill_tokens=700)]), PREFILL)[0] == 1
    two = context([stats(queued_prefill_tokens=350), stats(queued_prefill_tokens=350)])
    assert prefill_decision(two, PREFILL)[0] == 2
    # Below the band: down to one.
    low = context([stats(queued_prefill_tokens=250), stats(queued_prefill_tokens=250)])
    assert prefill_decision(low, PREFILL)[0] == 1


def test_prefill_keeps_replicas_for_prefills_in_flight():
    # Nothing queued on average, but 25 prefills running now: 10 per replica -> 3 stay.
    idle = [stats(), stats(), stats(), stats()]
    now = [stats(num_running=9), stats(num_running=8), stats(num_running=8), stats()]
    assert prefill_decision(context(idle, latest=now), PREFILL)[0] == 3
    assert prefill_decision(context(idle), PREFILL)[0] == 1


# ---------------------------------------------------------------------------------- decode

def test_decode_scales_up_on_kv_usage():
    ctx = context([stats(kv_usage=0.8, num_running=3), stats(kv_usage=0.7, num_running=3)])
    assert decode_decision(ctx, DECODE)[0] == 3  # 1.5 replicas of KV at 50% target


def test_decode_scales_up_on_running_sequences():
    ctx = context([stats(kv_usage=0.1, num_running=12, num_waiting=6), stats(kv_usage=0.1, num_running=9)])
    assert decode_decision(ctx, DECODE)[0] == 3  # 27 sequences at 10 per replica


def test_decode_never_drops_below_the_kv_in_flight():
    # The window's average is low (traffic just started), but the latest reports hold
    # 2.6 replicas' worth of KV: 3 replicas must stay (at most 90% each).
    averaged = [stats(kv_usage=0.05)] * 4
    now = [stats(kv_usage=0.9, num_running=2), stats(kv_usage=0.85, num_running=2),
           stats(kv_usage=0.85, num_running=2), stats()]
    assert decode_decision(context(averaged, latest=now), DECODE)[0] == 3
    assert decode_decision(context(averaged), DECODE)[0] == 1


def test_decode_holds_while_a_replica_has_not_reported():
    quiet = [stats(kv_usage=0.01), None, stats(kv_usage=0.01)]
    assert decode_decision(context(quiet), DECODE)[0] == 3
    busy = [stats(kv_usage=0.9), None, stats(kv_usage=0.9)]
    assert decode_decision(context(busy), DECODE)[0] == 4  # 1.8 / 0.5 -> 4: up is never held


def test_decode_respects_capacity_adjusted_bounds():
    busy = context([stats(kv_usage=1.0, num_running=20)] * 2, max_replicas=3)
    assert decode_decision(busy, DECODE)[0] == 3
    idle = context([stats()] * 4, min_replicas=2)
    assert decode_decision(idle, DECODE)[0] == 2


def test_colocated_counts_queued_prompts_when_asked():
    targets = DecodeTargets(target_queued_tokens_per_replica=1000)
    ctx = context([stats(queued_prefill_tokens=2500)])
    assert decode_decision(ctx, targets)[0] == 3
    assert decode_decision(ctx, DecodeTargets())[0] == 1


def test_without_engine_stats_the_request_count_decides():
    config = AutoscalingConfig(min_replicas=1, max_replicas=16, target_ongoing_requests=8)
    ctx = context([None, None], total_num_requests=40, config=config)
    replicas, state = decode_decision(ctx, DECODE)
    assert replicas == 5 and state["tandem"]["source"] == "ongoing_requests"
    assert prefill_decision(context([None, None], total_num_requests=4, config=config), PREFILL)[0] == 1


def test_bad_targets_are_refused():
    with pytest.raises(ValueError):
        PrefillTargets(target_queued_tokens_per_replica=0)
    with pytest.raises(ValueError):
        DecodeTargets(target_kv_usage=0.9, max_kv_usage=0.8)
    with pytest.raises(ValueError):
        DecodeTargets(downscale_utilization=1.5)


# ------------------------------------------------------------- through Serve's own machinery

def test_serve_accepts_the_pool_configs_and_builds_the_policies():
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    for pool, policy_class in (("prefill", PrefillPolicy), ("decode", DecodePolicy)):
        config = AutoscalingConfig(**pool_autoscaling_config(
            pool, {"max_replicas": 4, "targets": {"max_running_per_replica": 7}}))
        assert config.max_replicas == 4 and not config.policy.is_default_policy_function()
        policy = _resolve_policy_callable(config.policy)  # what the controller does, once
        assert type(policy).__name__ == policy_class.__name__
        assert policy.targets.max_running_per_replica == 7
    with pytest.raises(TypeError):
        pool_autoscaling_config("decode", {"targets": {"no_such_knob": 1}})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_serve_delays_wrap_the_decision(monkeypatch):
    """The controller's view: Serve's wrapper holds a decision for upscale/downscale_delay_s,
    and a blip the other way restarts the wait."""
    import ray.serve.autoscaling_policy as serve_policy

    clock = FakeClock()
    monkeypatch.setattr(serve_policy, "time", clock)
    config = AutoscalingConfig(**pool_autoscaling_config("decode", {
        "min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 10, "downscale_delay_s": 60,
        "targets": {"target_kv_usage": 0.5, "target_running_per_replica": 10, "max_kv_usage": 0.9,
                    "max_running_per_replica": 20}}))
    policy = serve_policy._apply_autoscaling_config(DecodePolicy(**config.policy.policy_kwargs))
    state: dict = {}

    def tick(per_replica, target, seconds):
        nonlocal state
        clock.now += seconds
        replicas, state = policy(context(per_replica, target=target, policy_state=state, config=config))
        return replicas

    busy = [stats(kv_usage=0.9)] * 2  # wants 4
    assert tick(busy, 2, 0) == 2
    assert tick(busy, 2, 5) == 2
    assert tick(busy, 2, 5) == 4  # held for 10 s: up
    idle = [stats()] * 4
    assert tick(idle, 4, 1) == 4
    assert tick(idle, 4, 40) == 4
    assert tick([stats(kv_usage=0.9)] * 4, 4, 1) == 4  # a blip: wants 8, restarts the timers
    assert tick(idle, 4, 1) == 4
    assert tick(idle, 4, 50) == 4  # 51 s since the blip < 60 s
    assert tick(idle, 4, 10) == 1  # 61 s: down
    assert state["tandem"]["source"] == "engine_stats"


# ------------------------------------------------------------------ wiring into workers.app

def test_app_args_put_the_pool_policy_on_its_deployment():
    from tandem.workers.app import AppArgs, _decode_pool

    args = AppArgs.from_dict({"mode": "disaggregated", "prefill_replicas": 2, "autoscaling": {
        "decode": {"min_replicas": 2, "max_replicas": 5, "targets": {"target_kv_usage": 0.6}}}})
    decode = _decode_pool(args, "/models/unused")._bound_deployment
    prefill = decode.init_args[1]._bound_deployment
    config = decode._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (2, 5)
    assert config.policy.policy_function == "tandem.workers.autoscaling:DecodePolicy"
    assert config.policy.policy_kwargs["target_kv_usage"] == 0.6
    assert prefill._deployment_config.autoscaling_config is None
    assert prefill._deployment_config.num_replicas == 2
    assert decode._deployment_config.graceful_shutdown_timeout_s >= prefill._deployment_config.graceful_shutdown_timeout_s

    colocated = AppArgs.from_dict({"autoscaling": {"colocated": {"max_replicas": 3}}})
    worker = _decode_pool(colocated, "/models/unused")._bound_deployment
    assert worker._deployment_config.autoscaling_config.policy.policy_function.endswith("DecodePolicy")


@pytest.mark.parametrize("autoscaling", [
    {"prefill": {"max_replicas": 2}},  # a colocated app has no prefill pool
    {"decode": {"min_replicas": 3, "max_replicas": 2}},  # Serve's own bound check
    {"decode": {"targets": {"target_kv_usage": 2.0}}},
    {"decode": {"targets": {"no_such_knob": 1}}},
])
def test_app_args_refuse_bad_autoscaling(autoscaling):
    from tandem.workers.app import AppArgs

    with pytest.raises(ValueError, match="autoscaling"):
        AppArgs.from_dict({"autoscaling": autoscaling})
