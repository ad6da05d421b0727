"""`tandem scale POOL N`: resize one pool (decode, prefill or colocated) of a running app in
place. Only that pool's replica count changes: the ingress, the other pool and the pool's
existing replicas keep running, caches and all (`cluster.apps.scale_app`)."""
from __future__ import annotations

import argparse
import json
import sys

from tandem.cluster.apps import POOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", choices=POOLS, help="a pool the running app has: decode and prefill "
                                                    "(disaggregated), or colocated")
    parser.add_argument("replicas", type=int)
    parser.add_argument("--app-name", default="tandem")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="wait this long (default 600) for the pool to run exactly N replicas (a leaving "
                             "replica drains first); 0: do not wait")


def run(args: argparse.Namespace) -> int:
    import ray

    from tandem.cluster.apps import scale_app
    from tandem.cluster.ray_session import join_cluster

    if not ray.is_initialized():
        join_cluster(args.address)
    try:
        new_args = scale_app(args.app_name, args.pool, args.replicas, timeout_s=args.timeout_s or None)
    except (LookupError, ValueError, TimeoutError) as e:  # exit 2: the request cannot be done; 1: it timed out
        print(f"tandem scale: {e}", file=sys.stderr)
        return 1 if isinstance(e, TimeoutError) else 2
    print(f"{args.app_name}: {args.pool} pool -> {args.replicas} replicas")
    print(json.dumps({k: new_args.get(k) for k in ("mode", "num_replicas", "prefill_replicas")}))
    return 0
