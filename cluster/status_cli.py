"""`tandem status`: the app's deployments (pools), their replica states, and per pool the
engines' KV use, prefix-cache hit rate and running/queued sequences; build args with --json."""
from __future__ import annotations

import argparse
import json

from tandem.workers.autoscaling import pool_autoscaling_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-name", default="tandem", help="the Serve application's name")
    parser.add_argument("--address", default="auto",
                        help="Ray cluster address (default: auto, $RAY_ADDRESS or the one running on this machine)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from tandem.cluster.apps import status_report
    from tandem.cluster.ray_session import join_cluster

    join_cluster(args.address)  # ConnectionError, one line from cluster/cli.py, when there is none
    report = status_report(args.app_name)  # LookupError when the app is not running
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    return 0


# engine deployment -> the app args holding its expert- and tensor-parallel degrees
_DEGREE_ARGS = {"LLMWorker": ("expert_parallel_size", "tensor_parallel_size"),
                "DecodeWorker": ("expert_parallel_size", "tensor_parallel_size"),
                "PrefillWorker": ("prefill_expert_parallel_size", "prefill_tensor_parallel_size")}


def replica_degree(deployment: str, args: dict | None) -> str | None:
    """How one replica of an engine deployment is split: "tp=N" / "ep=N" (ranks per replica),
    "tp=1" for a one-device replica; None for other deployments."""
    if deployment not in _DEGREE_ARGS:
        return None
    ep_name, tp_name = _DEGREE_ARGS[deployment]
    ep, tp = int((args or {}).get(ep_name, 1)), int((args or {}).get(tp_name, 1))
    return f"ep={ep}" if ep > 1 else f"tp={tp}"


def format_report(report: dict) -> str:
    lines = [f"app {report['app']}: {report['status']}"]
    autoscaling = (report.get("args") or {}).get("autoscaling") or {}
    for name, dep in report["deployments"].items():
        states = ", ".join(f"{k.lower()}={v}" for k, v in dep["replicas"].items()) or "no replicas"
        line = f"  {name:16s} {dep['status']:10s} {states}"
        degree = replica_degree(name, report.get("args"))
        if degree is not None:
            line += f"  ({degree} per replica)"
        engine = dep.get("engine")
        if engine:
            hit_rate = "-" if engine["prefix_hit_rate"] is None else f"{100 * engine['prefix_hit_rate']:.1f}%"
            line += (f"  | kv {100 * engine['kv_usage']:.1f}%  prefix hits {hit_rate}  "
                     f"running {engine['num_running']}  queued {engine['num_waiting']} "
                     f"({engine['num_waiting_tokens']} tokens)")
            if engine.get("host_kv_usage") is not None:
                host_hits = "-" if engine["host_hit_rate"] is None else f"{100 * engine['host_hit_rate']:.1f}%"
                line += f"  host tier {100 * engine['host_kv_usage']:.1f}% used, hits {host_hits}"
        lines.append(line)
    for pool, settings in autoscaling.items():
        config = pool_autoscaling_config(pool, settings)
        lines.append(f"  autoscaled: {pool} pool, {config['min_replicas']}..{config['max_replicas']} replicas "
                     f"({config['policy']['policy_function']})")
    return "\n".join(lines)
