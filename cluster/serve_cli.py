"""`tandem serve`: run the Tandem Serve app (OpenAI-compatible HTTP API in front of the engine
pool) on a local Ray or the cluster named by RAY_ADDRESS, until interrupted. The flags are
`router.app.build_app`'s args; the Serve config (`cluster/serve.yaml`) builds the same app."""
from __future__ import annotations

import argparse
import json
import os

from router.policy import POLICY_NAMES


def _engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: a tiny random Llama made on first use)")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    parser.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    parser.add_argument("--num-replicas", type=int, default=1, help="engine replicas per pool")
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


def app_args(args: argparse.Namespace) -> dict:
    built = {
        "mode": args.mode, "num_replicas": args.num_replicas, "ingress_replicas": args.ingress_replicas,
        "routing_policy": args.routing_policy, "device": args.device, "engine_kwargs": dict(args.engine_arg),
        "max_in_flight": args.max_in_flight,
    }
    for key in ("model", "served_model_name", "api_key"):
        if getattr(args, key):
            built[key] = getattr(args, key)
    return built


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from router.app import build_app

    app = build_app(app_args(args))  # bad args fail here, before Ray starts
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # join the existing cluster
    else:
        # A local Ray: Ray's CPU count is a scheduling unit, not a core. Ingress + two engine pools
        # need more units than a small machine's core count, so give at least 8 (they share cores).
        ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        serve.run(app, name=args.app_name, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
