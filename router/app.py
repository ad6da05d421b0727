"""`build_app(args)`: the Tandem Serve application (the Serve config's `router.app:build_app`).

One app, separately scaled deployments: `OpenAIIngress` (HTTP, tokenization) in front of the
engine pool. Modes:
- `colocated`: one `LLMWorker` deployment does prefill and decode; it is "the decode pool"
  the ingress calls.
- `disaggregated`: the ingress talks to a `DecodeWorker` pool, which sends long uncached
  prompts to a `PrefillWorker` pool and receives their KV over `kvtransfer`; same
  `generate(WorkerRequest) -> WorkerDelta` contract, so the ingress needs no change.

Every engine pool routes with `TandemRequestRouter` (prefix_aware | round_robin |
least_loaded | random), whose `block_size` is the engine's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from router.openai_ingress import IngressConfig, OpenAIIngress
from router.policy import POLICY_NAMES
from router.request_router import REQUEST_ROUTER_CLASS
from workers.serve_worker import LLMWorker

MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class AppArgs:
    """What `build_app` accepts (the Serve config's `args`); unknown keys are an error."""

    model: str | None = None  # model folder; None: the tiny default model
    served_model_name: str | None = None  # default: `model` as given
    mode: str = "colocated"
    num_replicas: int = 1  # engine replicas per pool
    ingress_replicas: int = 1
    routing_policy: str = "prefix_aware"
    routing: dict[str, Any] = field(default_factory=dict)  # further RoutingConfig fields
    api_key: str | None = None
    device: str = "cpu"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    max_in_flight: int = 256  # per ingress replica, then 429
    max_ongoing_requests: int = 256  # per engine replica
    max_n: int = 16
    max_body_bytes: int = 4 << 20
    worker_num_cpus: float = 1.0
    worker_num_gpus: float | None = None  # None: 1 when device is cuda, else 0
    ingress_num_cpus: float = 1.0
    # disaggregated mode: `num_replicas` is the decode pool, this the prefill pool
    prefill_replicas: int = 1
    disagg: dict[str, Any] = field(default_factory=dict)  # DisaggConfig fields
    transfer: dict[str, Any] = field(default_factory=dict)  # KVTransferConfig fields
    pool_resources: bool = False  # pin pools to nodes carrying custom resources prefill / decode

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> "AppArgs":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown app args {unknown}; known: {sorted(known)}")
        parsed = cls(**args)
        if parsed.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {parsed.mode!r}")
        if parsed.routing_policy not in POLICY_NAMES:
            raise ValueError(f"routing_policy must be one of {POLICY_NAMES}, got {parsed.routing_policy!r}")
        if parsed.num_replicas < 1 or parsed.ingress_replicas < 1 or parsed.max_in_flight < 1:
            raise ValueError("num_replicas, ingress_replicas and max_in_flight must be >= 1")
        return parsed


def _max_model_len(model: str, engine_kwargs: dict[str, Any]) -> int:
    from workers.model_runner import load_hf_config

    limit = load_hf_config(model).max_position_embeddings
    configured = engine_kwargs.get("max_model_len")
    return min(configured, limit) if configured else limit


def _router_config(args: AppArgs) -> RequestRouterConfig:
    kwargs = {"policy": args.routing_policy, "block_size": args.engine_kwargs.get("block_size", 16), **args.routing}
    return RequestRouterConfig(request_router_class=REQUEST_ROUTER_CLASS, request_router_kwargs=kwargs)


def _decode_pool(args: AppArgs, model: str) -> Application:
    """The deployment the ingress sends every request to: LLMWorker (colocated), or a
    DecodeWorker holding a handle to the prefill pool (disaggregated). Same streaming contract."""
    num_gpus = args.worker_num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if args.device.startswith("cuda") else 0.0

    def actor_options(pool: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": args.worker_num_cpus, "num_gpus": num_gpus}
        if args.pool_resources:
            opts["resources"] = {pool: 1}
        return opts

    common = dict(max_ongoing_requests=args.max_ongoing_requests, request_router_config=_router_config(args),
                  health_check_period_s=5)
    if args.mode == "colocated":
        worker = serve.deployment(LLMWorker, name="LLMWorker")
        return worker.options(num_replicas=args.num_replicas, ray_actor_options=actor_options("decode"),
                              **common).bind(model, dict(args.engine_kwargs), args.device)
    from workers.decode_worker import DecodeWorker
    from workers.prefill_worker import PrefillWorker

    prefill = serve.deployment(PrefillWorker, name="PrefillWorker").options(
        num_replicas=args.prefill_replicas, ray_actor_options=actor_options("prefill"), **common,
    ).bind(model, dict(args.engine_kwargs), args.device, dict(args.transfer))
    return serve.deployment(DecodeWorker, name="DecodeWorker").options(
        num_replicas=args.num_replicas, ray_actor_options=actor_options("decode"), **common,
    ).bind(model, prefill, dict(args.engine_kwargs), args.device, dict(args.disagg), dict(args.transfer))


def build_app(args: dict[str, Any] | None = None) -> Application:
    parsed = AppArgs.from_dict(args)
    if parsed.model:
        model = parsed.model
    else:
        from workers.generate_cli import default_model

        model = default_model()
    config = IngressConfig(
        model=model,
        served_model_name=parsed.served_model_name or parsed.model or "tandem-tiny-llama",
        max_model_len=_max_model_len(model, parsed.engine_kwargs),
        api_key=parsed.api_key or None,
        max_in_flight=parsed.max_in_flight,
        max_n=parsed.max_n,
        max_body_bytes=parsed.max_body_bytes,
    )
    return OpenAIIngress.options(
        num_replicas=parsed.ingress_replicas,
        # Above the ingress's own bound, so the excess reaches it and gets a 429 instead of
        # waiting in the proxy's queue.
        max_ongoing_requests=parsed.max_in_flight + 64,
        ray_actor_options={"num_cpus": parsed.ingress_num_cpus},
    ).bind(_decode_pool(parsed, model), config)
