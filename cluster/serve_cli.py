"""`tandem serve`: run the Tandem Serve app (OpenAI-compatible HTTP API in front of the engine
pool) on a local Ray or the cluster named by RAY_ADDRESS, until interrupted. The flags are
`workers.app.build_app`'s args; the Serve config (`cluster/serve.yaml`) builds the same app."""
from __future__ import annotations

import argparse
import json
import os

from tandem.router.policy import POLICY_NAMES


def _engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _autoscale_arg(text: str) -> tuple[str, dict[str, int]]:
    pool, sep, bounds = text.partition("=")
    low, colon, high = bounds.partition(":")
    if not sep or not colon or pool not in ("prefill", "decode", "colocated") or not (low.isdigit() and high.isdigit()):
        raise argparse.ArgumentTypeError(f"expected POOL=MIN:MAX (POOL: prefill, decode, colocated), got {text!r}")
    return pool, {"min_replicas": int(low), "max_replicas": int(high)}


def _expert_parallel_arg(text: str) -> tuple[str, int]:
    pool, sep, size = text.partition("=")
    if not sep or pool not in ("prefill", "decode", "colocated") or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected POOL=N (POOL: prefill, decode, colocated; N >= 1), got {text!r}")
    return pool, int(size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: a tiny random Llama made on first use)")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    parser.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    parser.add_argument("--num-replicas", type=int, default=1, help="engine replicas per pool")
    parser.add_argument("--prefill", type=int, metavar="N", help="disaggregated: N prefill replicas (with --decode)")
    parser.add_argument("--decode", type=int, metavar="M", help="disaggregated: M decode replicas (with --prefill)")
    parser.add_argument("--colocated", type=int, metavar="N", help="colocated: N replicas doing both phases")
    parser.add_argument("--autoscale", action="append", type=_autoscale_arg, default=[], metavar="POOL=MIN:MAX",
                        help="autoscale a pool between MIN and MAX replicas with its policy from "
                             "workers/autoscaling.py (repeatable; overrides that pool's count)")
    parser.add_argument("--expert-parallel", action="append", type=_expert_parallel_arg, default=[],
                        metavar="POOL=N",
                        help="MoE models: run each replica of POOL as an expert-parallel group of N GPUs "
                             "(attention data parallel over the N ranks, experts split); repeatable, each pool "
                             "its own N (default 1)")
    parser.add_argument("--pool-resources", action="store_true",
                        help="pin pools to nodes carrying the custom resources `prefill` / `decode`")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--routing-policy", choices=POLICY_NAMES, default="prefix_aware")
    parser.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $TANDEM_API_KEY; none: open)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                        help="an EngineConfig field, e.g. max_model_len=4096 (repeatable; values parsed as JSON)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests per ingress replica before 429")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--app-name", default="tandem")


def _pools(args: argparse.Namespace) -> tuple[str, int, int]:
    """(mode, decode-or-colocated replicas, prefill replicas) from the pool flags."""
    if args.colocated is not None and (args.prefill is not None or args.decode is not None):
        raise SystemExit("tandem serve: --colocated cannot be combined with --prefill/--decode")
    if (args.prefill is None) != (args.decode is None):
        raise SystemExit("tandem serve: --prefill and --decode go together")
    counts = [c for c in (args.colocated, args.prefill, args.decode) if c is not None]
    if any(c < 1 for c in counts):
        raise SystemExit("tandem serve: replica counts must be >= 1")
    if args.prefill is not None:
        return "disaggregated", args.decode, args.prefill
    if args.colocated is not None:
        return "colocated", args.colocated, 1
    return args.mode, args.num_replicas, args.num_replicas


def app_args(args: argparse.Namespace) -> dict:
    mode, num_replicas, prefill_replicas = _pools(args)
    built = {
        "mode": mode, "num_replicas": num_replicas, "prefill_replicas": prefill_replicas,
        "pool_resources": bool(getattr(args, "pool_resources", False)), "ingress_replicas": args.ingress_replicas,
        "routing_policy": args.routing_policy, "device": args.device, "engine_kwargs": dict(args.engine_arg),
        "max_in_flight": args.max_in_flight,
    }
    if mode == "colocated":
        del built["prefill_replicas"]
    if args.autoscale:
        built["autoscaling"] = dict(args.autoscale)
    for pool, size in getattr(args, "expert_parallel", None) or []:
        if pool == "prefill" and mode != "disaggregated":
            raise SystemExit("tandem serve: --expert-parallel prefill=N needs a prefill pool (--prefill/--decode)")
        if pool == "colocated" and mode != "colocated":
            raise SystemExit("tandem serve: --expert-parallel colocated=N needs colocated mode; use decode=N")
        built["prefill_expert_parallel_size" if pool == "prefill" else "expert_parallel_size"] = size
    for key in ("model", "served_model_name", "api_key"):
        if getattr(args, key):
            built[key] = getattr(args, key)
    return built


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from tandem.cluster.apps import deploy_app
    from tandem.workers.app import build_app

    built = app_args(args)
    build_app(built)  # bad args fail here, before Ray starts
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))  # join a running cluster (`ray up`)
    except ConnectionError:
        # None running: a local Ray. Its CPU count is a scheduling unit, not a core; ingress + two
        # engine pools need more units than a small machine's core count (they share cores).
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        deploy_app(args.app_name, built, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
