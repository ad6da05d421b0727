"""How many replicas each engine pool wants: Ray Serve custom autoscaling policies.

Serve's built-in signal (ongoing requests per replica) says little about an LLM pool: one
request can be 30 prompt tokens or 30,000, and a decode replica is full when its KV cache is,
not when it holds N requests. So each pool scales on what its engine reports through the
deployment method `record_autoscaling_stats()` (the float keys in `STAT_KEYS`, sent by every
replica to the Serve controller, which averages them over `look_back_period_s`):

- prefill pool: queued prefill tokens per replica, against `target_queued_tokens_per_replica`;
- decode pool (and the colocated one): KV-cache use and running + waiting sequences per
  replica, against `target_kv_usage` / `target_running_per_replica` (the larger wins).

The decision (`decide`) is a pure function of the pool's load and replica count:
- up as soon as the load needs more replicas than there are (`ceil(demand)`);
- down only to a count that would run at most `downscale_utilization` of the target, so a
  load hovering at the target does not flap (the hysteresis band);
- never below what in-flight work needs (`floor`): the sequences and KV the replicas hold
  right now (latest report, not the average) must fit on the replicas that stay, under the
  engine's own limits (`max_running_per_replica`, `max_kv_usage`);
- no scale-down while some running replica has not reported yet (a sum that misses a replica
  undercounts the load).
Serve's wrapper then applies the deployment's `upscale_delay_s` / `downscale_delay_s` (the
decision must hold that long), the up/down scaling factors, and `min_replicas` /
`max_replicas`; `graceful_shutdown_timeout_s` lets a leaving replica drain.

When no replica reports the stats (workers without `record_autoscaling_stats`), the policies
fall back to Serve's own signal: ongoing requests against `target_ongoing_requests`.

Serve imports a policy by path (`tandem.workers.autoscaling:PrefillPolicy`) and constructs it once
with the config's `policy_kwargs` (the targets below). This module imports nothing from Tandem:
Serve pickles it by value into the controller.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# What a worker's `record_autoscaling_stats()` returns (all floats, per replica).
STAT_KEYS = ("queued_prefill_tokens", "num_running", "num_waiting", "kv_usage")

POLICY_PATHS = {
    "prefill": "tandem.workers.autoscaling:PrefillPolicy",
    "decode": "tandem.workers.autoscaling:DecodePolicy",
    "colocated": "tandem.workers.autoscaling:DecodePolicy",  # one engine does both: KV and sequences bound it
}

_EPS = 1e-9


@dataclass(frozen=True)
class PoolLoad:
    """A pool's engine stats summed over the replicas that reported them."""

    num_reporting: int
    queued_prefill_tokens: float = 0.0
    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_usage: float = 0.0  # sum of per-replica fractions: replicas' worth of KV in use


@dataclass(frozen=True)
class PrefillTargets:
    """The prefill pool's policy knobs (the Serve config's `policy_kwargs`)."""

    # Prompt tokens waiting (queued or mid-chunked-prefill) per replica that keeps TTFT
    # acceptable: about a second or two of prefill work on one GPU.
    target_queued_tokens_per_replica: float = 16384.0
    # Sequences one replica runs at once (its engine's max_num_seqs): the floor keeps room
    # for every prefill in flight.
    max_running_per_replica: float = 64.0
    downscale_utilization: float = 0.6

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class DecodeTargets:
    """The decode (or colocated) pool's policy knobs (the Serve config's `policy_kwargs`)."""

    target_kv_usage: float = 0.7  # fraction of each replica's KV blocks in use
    target_running_per_replica: float = 64.0  # running + waiting sequences
    max_kv_usage: float = 0.95  # floor: in-flight KV must fit under this on the replicas left
    max_running_per_replica: float = 256.0  # floor: the engine's max_num_seqs
    downscale_utilization: float = 0.6
    # Colocated engines (and decode replicas prefilling short suffixes locally) also queue
    # prompts; set this to let queued prefill tokens count too.
    target_queued_tokens_per_replica: float | None = None

    def __post_init__(self) -> None:
        _check_positive(self)
        if not 0 < self.target_kv_usage <= self.max_kv_usage <= 1:
            raise ValueError("need 0 < target_kv_usage <= max_kv_usage <= 1")


def _check_positive(targets: Any) -> None:
    for f in fields(targets):
        value = getattr(targets, f.name)
        if value is not None and not value > 0:
            raise ValueError(f"{f.name} must be > 0, got {value!r}")
    if targets.downscale_utilization > 1:
        raise ValueError("downscale_utilization must be in (0, 1]")


# ---------------------------------------------------------------------------------------------
# pure pieces


def decide(current: int, demand: float, floor: int, downscale_utilization: float,
           min_replicas: int, max_replicas: int, complete: bool = True) -> int:
    """The replica count for a pool of `current` replicas whose load needs `demand` replicas
    at target, `floor` for the work in flight. `complete`: every running replica reported."""
    needed = math.ceil(demand - _EPS)
    if needed > current:
        desired = needed
    else:
        # Down only as far as the load stays under `downscale_utilization` of the target.
        desired = min(current, math.ceil(demand / downscale_utilization - _EPS))
        if not complete:
            desired = current
    desired = max(desired, floor)
    return max(min_replicas, min(max_replicas, desired))


def pool_load(metrics: dict[str, dict[Any, float]] | None, replicas: list[Any]) -> PoolLoad:
    """Sum each stat over `replicas` (ids of running replicas); a replica counts as reporting
    when it sent every key of `STAT_KEYS`."""
    metrics = metrics or {}
    reporting = [r for r in replicas if all(r in metrics.get(key, {}) for key in STAT_KEYS)]
    sums = {key: float(sum(metrics[key][r] for r in reporting)) for key in STAT_KEYS}
    return PoolLoad(num_reporting=len(reporting), **sums)


def latest_values(raw: dict[str, dict[Any, list]] | None) -> dict[str, dict[Any, float]]:
    """The newest point of each replica's time series (Serve's `raw_metrics`)."""
    latest: dict[str, dict[Any, float]] = {}
    for key, per_replica in (raw or {}).items():
        for replica, series in per_replica.items():
            if series:
                latest.setdefault(key, {})[replica] = float(series[-1].value)
    return latest


def prefill_demand(load: PoolLoad, targets: PrefillTargets) -> float:
    return load.queued_prefill_tokens / targets.target_queued_tokens_per_replica


def prefill_floor(load: PoolLoad, targets: PrefillTargets) -> int:
    return math.ceil(load.num_running / targets.max_running_per_replica - _EPS)


def decode_demand(load: PoolLoad, targets: DecodeTargets) -> float:
    demand = max(load.kv_usage / targets.target_kv_usage,
                 (load.num_running + load.num_waiting) / targets.target_running_per_replica)
    if targets.target_queued_tokens_per_replica:
        demand = max(demand, load.queued_prefill_tokens / targets.target_queued_tokens_per_replica)
    return demand


def decode_floor(load: PoolLoad, targets: DecodeTargets) -> int:
    # Running sequences hold their KV; a leaving replica would make them re-prefill elsewhere.
    return max(math.ceil(load.kv_usage / targets.max_kv_usage - _EPS),
               math.ceil(load.num_running / targets.max_running_per_replica - _EPS))


# ---------------------------------------------------------------------------------------------
# over Serve's AutoscalingContext


def _request_count_demand(ctx) -> float:
    """Serve's default signal, for pools whose workers report no engine stats."""
    target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 2.0
    return ctx.total_num_requests / target


def _pool_decision(ctx, demand_of, floor_of, targets) -> tuple[int, dict[str, Any]]:
    replicas = list(ctx.running_replicas)
    averaged = pool_load(ctx.aggregated_metrics, replicas)
    if averaged.num_reporting == 0:
        demand, floor, complete, source = _request_count_demand(ctx), 0, True, "ongoing_requests"
    else:
        latest = pool_load(latest_values(ctx.raw_metrics), replicas)
        if latest.num_reporting < averaged.num_reporting:
            latest = averaged
        demand = demand_of(averaged, targets)
        # The floor follows the latest point: in-flight work now, not the window's mean.
        floor = max(floor_of(latest, targets), floor_of(averaged, targets))
        complete, source = averaged.num_reporting >= ctx.current_num_replicas, "engine_stats"
    desired = decide(ctx.current_num_replicas, demand, floor, targets.downscale_utilization,
                     ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas, complete)
    state = dict(ctx.policy_state or {})
    state["tandem"] = {"demand": demand, "floor": floor, "source": source, "desired": desired}
    return desired, state


def prefill_decision(ctx, targets: PrefillTargets = PrefillTargets()) -> tuple[int, dict[str, Any]]:
    """(replicas, policy state) for the prefill pool."""
    return _pool_decision(ctx, prefill_demand, prefill_floor, targets)


def decode_decision(ctx, targets: DecodeTargets = DecodeTargets()) -> tuple[int, dict[str, Any]]:
    """(replicas, policy state) for the decode or colocated pool."""
    return _pool_decision(ctx, decode_demand, decode_floor, targets)


class PrefillPolicy:
    """Serve's class-callable policy for the prefill pool; kwargs are `PrefillTargets` fields."""

    def __init__(self, **targets: Any) -> None:
        self.targets = PrefillTargets(**targets)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        return prefill_decision(ctx, self.targets)


class DecodePolicy:
    """Serve's class-callable policy for the decode pool; kwargs are `DecodeTargets` fields."""

    def __init__(self, **targets: Any) -> None:
        self.targets = DecodeTargets(**targets)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        return decode_decision(ctx, self.targets)


# ---------------------------------------------------------------------------------------------
# Serve deployment options


# Per-pool defaults: prefill reacts fast (TTFT suffers while prompts queue); decode leaves
# slowly (a replica going away with live sequences costs their re-prefill).
POOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "prefill": {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 15.0, "downscale_delay_s": 300.0,
                "look_back_period_s": 30.0, "target_ongoing_requests": 8},
    "decode": {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
               "look_back_period_s": 30.0, "target_ongoing_requests": 96},
}
POOL_DEFAULTS["colocated"] = POOL_DEFAULTS["decode"]
TARGETS = {"prefill": PrefillTargets, "decode": DecodeTargets, "colocated": DecodeTargets}


def pool_autoscaling_config(pool: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deployment's `autoscaling_config` for `pool`: Serve's AutoscalingConfig fields
    (defaults in `POOL_DEFAULTS`, overridden by `settings`) with the pool's policy; the policy's
    targets go in `settings["targets"]` (checked here)."""
    if pool not in POLICY_PATHS:
        raise ValueError(f"pool must be one of {sorted(POLICY_PATHS)}, got {pool!r}")
    settings = dict(settings or {})
    targets = TARGETS[pool](**settings.pop("targets", {}))
    config = {**POOL_DEFAULTS[pool], **settings}
    config["policy"] = {"policy_function": POLICY_PATHS[pool],
                        "policy_kwargs": {k: v for k, v in asdict(targets).items() if v is not None}}
    return config
