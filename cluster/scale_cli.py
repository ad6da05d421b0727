"""`tandem scale POOL N`: resize the decode, prefill or colocated pool of a running app."""
from __future__ import annotations

import argparse
import json

from tandem.cluster.apps import POOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", choices=POOLS)
    parser.add_argument("replicas", type=int)
    parser.add_argument("--app-name", default="tandem")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")


def run(args: argparse.Namespace) -> int:
    import ray

    from tandem.cluster.apps import scale_app

    ray.init(address=args.address, log_to_driver=False)
    try:
        new_args = scale_app(args.app_name, args.pool, args.replicas)
    except (LookupError, ValueError) as e:
        print(f"tandem scale: {e}")
        return 2
    print(f"{args.app_name}: {args.pool} pool -> {args.replicas} replicas")
    print(json.dumps({k: new_args.get(k) for k in ("mode", "num_replicas", "prefill_replicas")}))
    return 0
