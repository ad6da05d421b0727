"""`tandem serve`: run the Tandem Serve app (OpenAI-compatible HTTP API in front of the engine
pool) on a local Ray or the cluster named by RAY_ADDRESS, until interrupted. The flags are
`workers.app.build_app`'s args; the Serve config (`cluster/serve.yaml`) builds the same app.

In order: the args are checked (before Ray starts); Ray is joined, or started locally; Serve's
HTTP proxies start listening (on loopback unless told otherwise; a warning goes to stderr when
they listen beyond this machine with no API key); the app is deployed; once `GET /health`
answers 200 (every engine pool has a running engine; until then it answers 503) the ready line
`serving on http://HOST:PORT/v1 (Ctrl-C to stop)` goes to stdout, and not before. Ctrl-C or
SIGTERM deletes the app (its replicas drain) and, on a Ray this command started, stops that Ray.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from tandem.engine.config import KV_CACHE_DTYPES
from tandem.router.policy import POLICY_NAMES

API_KEY_ENV = "TANDEM_API_KEY"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 300.0  # after Serve reports the app running, for its HTTP route to answer /health
# Serve's controller and proxies: their INFO lines (deployments added, routes updated, one line
# per request at the proxy) are not this command's output; warnings and errors still print.
SERVE_SYSTEM_LOGGING = {"log_level": "WARNING"}


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


def _pool_degree_arg(text: str) -> tuple[str, int]:
    pool, sep, size = text.partition("=")
    if not sep or pool not in ("prefill", "decode", "colocated") or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected POOL=N (POOL: prefill, decode, colocated; N >= 1), got {text!r}")
    return pool, int(size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: a tiny random Llama made on first use)")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: --model)")
    parser.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated",
                        help="one pool doing both phases, or a prefill and a decode pool")
    parser.add_argument("--num-replicas", type=int, default=1, help="engine replicas per pool")
    parser.add_argument("--prefill", type=int, metavar="N",
                        help="disaggregated: N prefill replicas (with --decode; default: --num-replicas)")
    parser.add_argument("--decode", type=int, metavar="M",
                        help="disaggregated: M decode replicas (with --prefill; default: --num-replicas)")
    parser.add_argument("--colocated", type=int, metavar="N",
                        help="colocated: N replicas doing both phases (default: --num-replicas)")
    parser.add_argument("--autoscale", action="append", type=_autoscale_arg, default=[], metavar="POOL=MIN:MAX",
                        help="autoscale a pool between MIN and MAX replicas with its policy from "
                             "workers/autoscaling.py (repeatable; overrides that pool's count; default: none)")
    parser.add_argument("--expert-parallel", action="append", type=_pool_degree_arg, default=[],
                        metavar="POOL=N",
                        help="MoE models: run each replica of POOL as an expert-parallel group of N GPUs "
                             "(attention data parallel over the N ranks, experts split); repeatable, each pool "
                             "its own N (default: 1)")
    parser.add_argument("--tensor-parallel", action="append", type=_pool_degree_arg, default=[], metavar="POOL=N",
                        help="run each replica of POOL as a tensor-parallel group of N GPUs (every layer split "
                             "over the N ranks; colocated pools for now); repeatable (default: 1)")
    parser.add_argument("--pool-resources", action="store_true",
                        help="pin pools to nodes carrying the custom resources `prefill` / `decode`")
    parser.add_argument("--ingress-replicas", type=int, default=1, help="OpenAI ingress (HTTP) replicas")
    parser.add_argument("--routing-policy", choices=POLICY_NAMES, default="prefix_aware",
                        help="how the pools' request router picks a replica")
    parser.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV} if set, "
                                          "else no key: anyone who reaches the port may use it)")
    parser.add_argument("--device", default="cpu", help="the engines' device: cpu or cuda")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="what the engines' KV cache stores: auto (the model dtype) or fp8 (e4m3, half the "
                             "bytes per token; GPUs of compute capability >= 8.9); the same as "
                             "--engine-arg kv_cache_dtype=fp8")
    parser.add_argument("--quantization", choices=("fp8",), default=None,
                        help="fp8: e4m3 weights, quantized while loading a bf16/fp32 checkpoint (an FP8 "
                             "checkpoint loads as FP8 without it); default: none, the checkpoint's own format")
    parser.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                        help="an EngineConfig field, e.g. max_model_len=4096 (repeatable; values parsed as JSON; "
                             "default: the engine's defaults)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests per ingress replica before 429")
    parser.add_argument("--host", default=LOOPBACK,
                        help="the interface Serve's HTTP proxies listen on; 0.0.0.0 for all (see docs/CLUSTER.md)")
    parser.add_argument("--port", type=int, default=8000, help="the HTTP port")
    parser.add_argument("--app-name", default="tandem", help="the Serve application's name")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(args.engine_arg)
    kv = getattr(args, "kv_cache_dtype", "auto")
    if kv != "auto":
        if kwargs.get("kv_cache_dtype", kv) != kv:
            raise ValueError(f"--kv-cache-dtype {kv} contradicts --engine-arg kv_cache_dtype={kwargs['kv_cache_dtype']}")
        kwargs["kv_cache_dtype"] = kv
    quantization = getattr(args, "quantization", None)
    if quantization is not None:
        if kwargs.get("quantization", quantization) != quantization:
            raise ValueError(f"--quantization {quantization} contradicts --engine-arg "
                             f"quantization={kwargs['quantization']}")
        kwargs["quantization"] = quantization
    return kwargs


def _pools(args: argparse.Namespace) -> tuple[str, int, int]:
    """(mode, decode-or-colocated replicas, prefill replicas) from the pool flags."""
    if args.colocated is not None and (args.prefill is not None or args.decode is not None):
        raise ValueError("--colocated cannot be combined with --prefill/--decode")
    if (args.prefill is None) != (args.decode is None):
        raise ValueError("--prefill and --decode go together")
    counts = [c for c in (args.colocated, args.prefill, args.decode) if c is not None]
    if any(c < 1 for c in counts):
        raise ValueError("replica counts must be >= 1")
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
        "routing_policy": args.routing_policy, "device": args.device, "engine_kwargs": _engine_kwargs(args),
        "max_in_flight": args.max_in_flight,
    }
    if mode == "colocated":
        del built["prefill_replicas"]
    if args.autoscale:
        built["autoscaling"] = dict(args.autoscale)
    for kind in ("expert", "tensor"):
        for pool, size in getattr(args, f"{kind}_parallel", None) or []:
            if pool == "prefill" and mode != "disaggregated":
                raise ValueError(f"--{kind}-parallel prefill=N needs a prefill pool (--prefill/--decode)")
            if pool == "colocated" and mode != "colocated":
                raise ValueError(f"--{kind}-parallel colocated=N needs colocated mode; use decode=N")
            built[f"prefill_{kind}_parallel_size" if pool == "prefill" else f"{kind}_parallel_size"] = size
    for key in ("model", "served_model_name"):
        if getattr(args, key):
            built[key] = getattr(args, key)
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        built["api_key"] = api_key
    return built


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning for an endpoint reachable beyond this machine with no key, else None."""
    if api_key or _is_loopback(host):
        return None
    return (f"tandem serve: warning: listening on {_url_host(host)}:{port} (beyond this machine) with no API key: "
            f"anyone who can reach the port can use the model; set --api-key or ${API_KEY_ENV}, "
            f"or --host {LOOPBACK}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _probe_host(host: str) -> str:
    """Where this machine reaches a proxy listening on `host`."""
    return {"0.0.0.0": LOOPBACK, "": LOOPBACK, "::": "::1"}.get(host, host)


def wait_until_answering(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except (OSError, urllib.error.URLError) as error:
            last = type(error).__name__
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s (last: {last})")


def _listening(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxies really listen: a cluster whose Serve was started before (`serve
    start` in the cluster YAMLs) keeps its own HTTP options."""
    from ray.serve.context import _get_global_client

    try:
        options = _get_global_client().http_config
        return options.host, options.port
    except Exception:  # a private accessor of Serve's: without it, what was asked for
        return host, port


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from tandem.cluster.apps import deploy_app
    from tandem.cluster.ray_session import start_or_join
    from tandem.engine.config import check_device
    from tandem.workers.app import build_app

    built = app_args(args)
    build_app(built)  # bad args fail here, before Ray starts
    started_local = start_or_join()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same clean stop as Ctrl-C
    deployed = False
    try:
        if started_local:  # a joined cluster may have (or add) GPU nodes this machine lacks
            check_device(args.device)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=SERVE_SYSTEM_LOGGING)
        host, port = _listening(args.host, args.port)
        if (host, port) != (args.host, args.port):
            print(f"tandem serve: note: Serve already runs on this cluster, listening on {_url_host(host)}:{port}; "
                  "--host/--port do not apply", file=sys.stderr, flush=True)
        warning = exposure_warning(host, port, built.get("api_key"))
        if warning:
            print(warning, file=sys.stderr, flush=True)
        deployed = True
        deploy_app(args.app_name, built)  # returns once Serve runs every deployment
        wait_until_answering(f"http://{_url_host(_probe_host(host))}:{port}/health")
        print(f"serving on http://{_url_host(host)}:{port}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            if deployed:
                serve.delete(args.app_name)  # its replicas drain; Serve and other apps stay
        finally:
            if started_local:
                ray.shutdown()  # the local Ray, Serve's controller and proxy with it
