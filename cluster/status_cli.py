"""`tandem status`: the app's deployments (pools), their replica states and build args."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-name", default="tandem")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.apps import status_report

    ray.init(address=args.address, log_to_driver=False)
    try:
        report = status_report(args.app_name)
    except LookupError as e:
        print(f"tandem status: {e}")
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"app {report['app']}: {report['status']}")
    for name, dep in report["deployments"].items():
        states = ", ".join(f"{k.lower()}={v}" for k, v in dep["replicas"].items()) or "no replicas"
        print(f"  {name:16s} {dep['status']:10s} {states}")
    return 0
