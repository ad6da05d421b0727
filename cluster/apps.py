"""What `tandem serve`, `tandem scale` and `tandem status` share: the running app's build args,
kept in Ray's cluster KV store so any later process on the cluster can rebuild the same app with
a pool resized. Scaling re-applies the app in place (`serve.run` with the same name): only the
replica count changes, so Serve updates it without restarting the other deployments' replicas.
"""
from __future__ import annotations

import json
from typing import Any

_KEY = "tandem/app/{name}"
POOLS = ("decode", "prefill", "colocated")


def _kv():
    # Ray's own libraries keep small cluster-wide state here; it lives as long as the cluster.
    from ray.experimental import internal_kv

    return internal_kv


def deploy_app(name: str, args: dict[str, Any], route_prefix: str = "/", blocking: bool = False):
    """Build and run the app, remembering its args for `scale`/`status`."""
    from ray import serve

    from router.app import build_app

    app = build_app(args)  # bad args fail here, before anything is recorded
    _kv()._internal_kv_put(_KEY.format(name=name), json.dumps(args), overwrite=True)
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)


def load_app_args(name: str) -> dict[str, Any]:
    raw = _kv()._internal_kv_get(_KEY.format(name=name))
    if raw is None:
        raise LookupError(f"no Tandem app named {name!r} was started on this cluster (use `tandem serve`)")
    return json.loads(raw)


def scale_app(name: str, pool: str, replicas: int) -> dict[str, Any]:
    """Set one pool's replica count; returns the new args."""
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
    deploy_app(name, args)
    return args


def status_report(name: str) -> dict[str, Any]:
    """Deployments of the app with their status and replica states, plus the build args."""
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
    try:
        args = load_app_args(name)
    except LookupError:
        args = None
    return {"app": name, "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "deployments": deployments, "args": args}
