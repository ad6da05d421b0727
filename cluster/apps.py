"""What `tandem serve`, `tandem scale` and `tandem status` share: the running app's build args,
kept in Ray's cluster KV store so any later process on the cluster can see how the app was built.

Scaling uses Serve's external scaling API (the one behind the dashboard's
`POST /api/v1/applications/{app}/deployments/{deployment}/scale`): the controller sets one
deployment's target replica count and nothing else. Re-applying the app with `serve.run`
instead (what `tandem scale` once did) restarts every replica of every deployment, whatever
changed: an app deployed from Python gets a fresh random code version on each `serve.run`,
and a replica of another code version is "outdated". So `deploy_app` turns external scaling
on, and `scale_app` never redeploys.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

_KEY = "tandem/app/{name}"
POOLS = ("decode", "prefill", "colocated")  # what `tandem scale` takes: router.app's POOL_DEPLOYMENTS
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # Serve's full replica ids (and replica actor names) start so


def _kv():
    # Ray's own libraries keep small cluster-wide state here; it lives as long as the cluster.
    from ray.experimental import internal_kv

    return internal_kv


def _record_app_args(name: str, args: dict[str, Any]) -> None:
    _kv()._internal_kv_put(_KEY.format(name=name), json.dumps(args), overwrite=True)


def deploy_app(name: str, args: dict[str, Any], route_prefix: str = "/", blocking: bool = False):
    """Build and run the app, remembering its args for `scale`/`status`. Redeploying restarts
    every replica (Serve gives the deployments a new code version); resize with `scale_app`."""
    from ray import serve

    from tandem.workers.app import build_app

    app = build_app(args)  # bad args fail here, before anything is recorded
    _record_app_args(name, args)
    # Serve allows external scaling only in an app that autoscales nothing (its config schema
    # refuses both together): an autoscaled pool is sized by its policy alone.
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking,
                     external_scaler_enabled=not args.get("autoscaling"))


def load_app_args(name: str) -> dict[str, Any]:
    raw = _kv()._internal_kv_get(_KEY.format(name=name))
    if raw is None:
        raise LookupError(f"no Tandem app named {name!r} was started on this cluster (use `tandem serve`)")
    return json.loads(raw)


def _serve_controller():
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        raise LookupError("Serve is not running on this cluster (use `tandem serve`)") from None


def _replica_states(name: str, deployment: str) -> tuple[str, dict[str, int]]:
    from ray import serve

    app = serve.status().applications.get(name)
    status = app.deployments.get(deployment) if app is not None else None
    if status is None:
        raise LookupError(f"the deployment {deployment!r} of app {name!r} is gone")
    states = {str(getattr(k, "value", k)): v for k, v in status.replica_states.items() if v}
    return str(getattr(status.status, "value", status.status)), states


def scale_app(name: str, pool: str, replicas: int, timeout_s: float | None = 600.0) -> dict[str, Any]:
    """Set one pool's replica count in place and return the app's args with the new count.

    Only that deployment's target changes: the ingress, the other pool and the pool's existing
    replicas keep running with their caches; a scale-down stops the newest replicas, each
    draining first. A pool the running app does not have is a ValueError, and so is a pool of
    an app that autoscales (its policies own its sizes). Waits up to `timeout_s` (None: does not
    wait) until the pool runs exactly `replicas` replicas, else TimeoutError (Serve goes on)."""
    import ray
    from ray import serve
    from ray.serve._private.common import DeploymentID

    from tandem.workers.app import POOL_DEPLOYMENTS

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    args = load_app_args(name)
    controller = _serve_controller()
    running = serve.status().applications.get(name)
    if running is None:
        raise LookupError(f"app {name!r} is not running on this cluster (use `tandem serve`)")
    deployment = POOL_DEPLOYMENTS[pool]
    if deployment not in running.deployments:
        pools = [p for p, d in POOL_DEPLOYMENTS.items() if d in running.deployments]
        raise ValueError(f"app {name!r} has no {pool} pool (it is {args.get('mode', 'colocated')}; "
                         f"its pools: {', '.join(pools)})")
    if args.get("autoscaling"):
        raise ValueError(f"app {name!r} autoscales its {' and '.join(sorted(args['autoscaling']))} pool: its "
                         "policies size the pools, and Serve's external scaling, which `tandem scale` uses, is "
                         "off in an app that autoscales; restart it with `tandem serve` to change that")
    if not ray.get(controller.get_external_scaler_enabled.remote(name)):
        raise ValueError(f"app {name!r} was deployed without Serve's external scaling (by an older Tandem?): "
                         "restart it with `tandem serve` to scale its pools in place")
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=deployment, app_name=name), replicas))
    args["prefill_replicas" if pool == "prefill" else "num_replicas"] = replicas
    _record_app_args(name, args)
    if timeout_s is not None:
        _wait_for_pool(name, deployment, replicas, timeout_s)
    return args


def _wait_for_pool(name: str, deployment: str, replicas: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status, states = _replica_states(name, deployment)
        if states == {"RUNNING": replicas} and status == "HEALTHY":
            return
        if time.monotonic() > deadline:
            now = ", ".join(f"{k.lower()}={v}" for k, v in sorted(states.items())) or "no replicas"
            raise TimeoutError(f"{deployment} has not settled at {replicas} replicas after {timeout_s:g} s "
                               f"(now {status}: {now}); Serve keeps at it, see `tandem status`")
        time.sleep(0.5)


@dataclass(frozen=True)
class PoolEngineStats:
    """One deployment's engines, summed (or averaged) over the replicas that report."""

    replicas: int  # replicas whose engine stats are on the board
    kv_usage: float  # mean fraction of KV blocks in use
    prefix_hit_rate: float | None  # prompt tokens found in the prefix cache / looked up; None: no lookups
    num_running: int
    num_waiting: int
    num_waiting_tokens: int  # prompt tokens queued, not yet computed
    # The host tier (None where no replica of the pool has one): hits / lookups, mean use.
    host_hit_rate: float | None = None
    host_kv_usage: float | None = None


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
            **_host_tier_view(reports, queries),
        )
    return pools


def _host_tier_view(reports: list[dict[str, Any]], queries: int) -> dict[str, float | None]:
    tiered = [r for r in reports if r.get("host_kv_total_blocks", 0)]
    if not tiered:
        return {}
    hits = sum(r.get("host_cache_hits", 0) for r in tiered)
    return {"host_hit_rate": hits / queries if queries else None,
            "host_kv_usage": sum(float(r.get("host_kv_usage", 0.0)) for r in tiered) / len(tiered)}


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
