"""What `tandem serve`, `tandem scale` and `tandem status` share: the running app's build args,
kept in Ray's cluster KV store so any later process on the cluster can rebuild the same app with
a pool resized. Scaling re-applies the app in place (`serve.run` with the same name): only the
replica count changes, so Serve updates it without restarting the other deployments' replicas.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

_KEY = "tandem/app/{name}"
POOLS = ("decode", "prefill", "colocated")
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # Serve's full replica ids (and replica actor names) start so


def _kv():
    # Ray's own libraries keep small cluster-wide state here; it lives as long as the cluster.
    from ray.experimental import internal_kv

    return internal_kv


def deploy_app(name: str, args: dict[str, Any], route_prefix: str = "/", blocking: bool = False):
    """Build and run the app, remembering its args for `scale`/`status`."""
    from ray import serve

    from tandem.workers.app import build_app

    app = build_app(args)  # bad args fail here, before anything is recorded
    _kv()._internal_kv_put(_KEY.format(name=name), json.dumps(args), overwrite=True)
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)


def load_app_args(name: str) -> dict[str, Any]:
    raw = _kv()._internal_kv_get(_KEY.format(name=name))
    if raw is None:
        raise LookupError(f"no Tandem app named {name!r} was started on this cluster (use `tandem serve`)")
    return json.loads(raw)


def scale_app(name: str, pool: str, replicas: int) -> dict[str, Any]:
    """Set one pool's replica count; returns the new args. An autoscaled pool is pinned at
    `replicas` from then on (its autoscaling entry is dropped; `tandem serve` sets it again)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    args = load_app_args(name)
    mode = args.get("mode", "colocated")
    if pool == "prefill":
        if mode != "disaggregated":
            raise ValueError(f"app {name!r} is {mode}: it has no prefill pool")
        args["prefill_replicas"] = replicas
    elif pool == "colocated" and mode != "colocated":
        raise ValueError(f"app {name!r} is {mode}: scale `decode` or `prefill`")
    else:
        args["num_replicas"] = replicas  # the decode pool, or the colocated one
    autoscaling = args.get("autoscaling") or {}
    for alias in (("decode", "colocated") if pool in ("decode", "colocated") else (pool,)):
        autoscaling.pop(alias, None)
    args["autoscaling"] = autoscaling
    deploy_app(name, args)
    return args


@dataclass(frozen=True)
class PoolEngineStats:
    """One deployment's engines, summed (or averaged) over the replicas that report."""

    replicas: int  # replicas whose engine stats are on the board
    kv_usage: float  # mean fraction of KV blocks in use
    prefix_hit_rate: float | None  # prompt tokens found in the prefix cache / looked up; None: no lookups
    num_running: int
    num_waiting: int
    num_waiting_tokens: int  # prompt tokens queued, not yet computed


def pool_engine_stats(app_name: str, per_replica: dict[str, dict[str, Any]]) -> dict[str, PoolEngineStats]:
    """Group the stats board's per-replica `EngineStats` dicts (keyed by Serve's full replica
    id, `SERVE_REPLICA::app#Deployment#id`, which is also the replica actor's name) by deployment."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for replica_id, stats in per_replica.items():
        app, _, rest = replica_id.removeprefix(REPLICA_ACTOR_PREFIX).partition("#")
        deployment = rest.rpartition("#")[0]
        if app == app_name and deployment:
            grouped.setdefault(deployment, []).append(stats)
    pools = {}
    for deployment, reports in sorted(grouped.items()):
        queries = sum(r.get("prefix_cache_queries", 0) for r in reports)
        hits = sum(r.get("prefix_cache_hits", 0) for r in reports)
        pools[deployment] = PoolEngineStats(
            replicas=len(reports),
            kv_usage=sum(float(r.get("kv_usage", 0.0)) for r in reports) / len(reports),
            prefix_hit_rate=hits / queries if queries else None,
            num_running=sum(int(r.get("num_running", 0)) for r in reports),
            num_waiting=sum(int(r.get("num_waiting", 0)) for r in reports),
            num_waiting_tokens=sum(int(r.get("num_waiting_tokens", 0)) for r in reports),
        )
    return pools


def _live_engine_stats(name: str, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """The app's stats board (what the workers push for `/metrics`), less the replicas that
    are gone (a board entry lingers until it is stale)."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    from tandem.router.openai_metrics import STATS_NAMESPACE, stats_board_name

    try:
        board = ray.get_actor(stats_board_name(name), namespace=STATS_NAMESPACE)
        snapshot = ray.get(board.snapshot.remote(), timeout=timeout_s)
    except Exception:  # no board yet (no worker has reported) or it did not answer: no engine view
        return {}
    live = {}
    for replica_id, stats in snapshot.items():
        try:
            ray.get_actor(replica_id, namespace=SERVE_NAMESPACE)
        except ValueError:
            continue
        live[replica_id] = stats
    return live


def status_report(name: str) -> dict[str, Any]:
    """Deployments of the app with their status and replica states, the engines' view per pool
    (KV use, prefix hit rate, running/queued), plus the build args."""
    from ray import serve

    status = serve.status()
    app = status.applications.get(name)
    if app is None:
        raise LookupError(f"no Serve application named {name!r}; running: {sorted(status.applications)}")
    deployments = {
        dep_name: {"status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                   "replicas": {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}}
        for dep_name, dep in app.deployments.items()
    }
    for dep_name, engine in pool_engine_stats(name, _live_engine_stats(name)).items():
        if dep_name in deployments:
            deployments[dep_name]["engine"] = asdict(engine)
    try:
        args = load_app_args(name)
    except LookupError:
        args = None
    return {"app": name, "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "deployments": deployments, "args": args}
