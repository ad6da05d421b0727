"""`build_app(args)`: the Tandem Serve application (the Serve config's `tandem.workers.app:build_app`).

One app, separately scaled deployments: `OpenAIIngress` (HTTP, tokenization) in front of the
engine pool. Modes:
- `colocated`: one `LLMWorker` deployment does prefill and decode; it is "the decode pool"
  the ingress calls.
- `disaggregated`: the ingress talks to a `DecodeWorker` pool, which sends long uncached
  prompts to a `PrefillWorker` pool and receives their KV over `kvtransfer`; same
  `generate(WorkerRequest) -> WorkerDelta` contract, so the ingress needs no change.

Every engine pool routes with `TandemRequestRouter` (prefix_aware | round_robin |
least_loaded | random), whose `block_size` is the engine's.

A pool is fixed at its replica count, or autoscaled when `autoscaling` names it: then Serve
runs that pool's policy from `workers.autoscaling` (prefill on queued prompt tokens, decode on
KV use and running sequences) between its min and max replicas.

A pool runs a mixture-of-experts model expert parallel when its `expert_parallel_size` N > 1
(`expert_parallel_size`: the decode or colocated pool; `prefill_expert_parallel_size`: the
prefill pool): each replica is then an expert-parallel group of N ranks, one GPU each
(`workers.ep_replica`), and Serve reserves the N bundles of a replica together (a placement
group, STRICT_PACK: one node). The router sees one replica per group.

A pool runs a model tensor parallel when its `tensor_parallel_size` N > 1
(`prefill_tensor_parallel_size` for the prefill pool): each replica is then a tensor-parallel
group of N ranks (`workers.tp_replica`), reserved the same way (N bundles, STRICT_PACK): a
colocated pool, or either pool of a disaggregated app, with any two degrees the KV heads allow
(each prefill rank sends its KV heads to the decode ranks holding them, `workers.tp_disagg`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.deployment import Application

from tandem.workers.autoscaling import pool_autoscaling_config
from tandem.router.openai_ingress import IngressConfig, OpenAIIngress
from tandem.router.policy import POLICY_NAMES
from tandem.router.request_router import REQUEST_ROUTER_CLASS
from tandem.workers.serve_worker import LLMWorker

MODES = ("colocated", "disaggregated")
# Each engine pool's Serve deployment: a colocated app has the first, a disaggregated one the
# other two. `tandem scale POOL` resizes exactly that deployment.
POOL_DEPLOYMENTS = {"colocated": "LLMWorker", "prefill": "PrefillWorker", "decode": "DecodeWorker"}
# A replica leaving (scale-down by hand or by the autoscaler) first stops taking requests and
# finishes the ones it has, up to this long; a decode replica's sequences are long-lived.
DRAIN_TIMEOUT_S = {"prefill": 120.0, "decode": 300.0}
# Serve's replica-side latency knobs (Ray >= 2.5x, `ray/serve/_private/constants.py`), read when a
# replica process starts, so they travel in its runtime_env. By default a replica runs its
# user code on a second event loop in another thread, and a handle's router on a third: every
# request and every streamed item then crosses threads twice (call_soon_threadsafe + a future),
# in the ingress and in the engine replicas alike. Tandem's replica code never blocks its loop
# (the engine steps on its own thread, long tokenization and templating go to threads), so the
# one loop is safe. `serve_low_latency=False` restores Serve's defaults.
LOW_LATENCY_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                         "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


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
    # The ingress's LRU of tokenized chat pieces, in characters of text (0: off; IngressConfig).
    tokenize_cache_chars: int = 64 << 20
    worker_num_cpus: float = 1.0
    worker_num_gpus: float | None = None  # None: 1 when device is cuda, else 0
    ingress_num_cpus: float = 1.0
    # disaggregated mode: `num_replicas` is the decode pool, this the prefill pool
    prefill_replicas: int = 1
    disagg: dict[str, Any] = field(default_factory=dict)  # DisaggConfig fields
    transfer: dict[str, Any] = field(default_factory=dict)  # KVTransferConfig fields
    pool_resources: bool = False  # pin pools to nodes carrying custom resources prefill / decode
    # pool ("prefill", "decode"; "colocated" or "decode" for the colocated pool) -> Serve
    # AutoscalingConfig fields plus `targets` (the policy's knobs, workers.autoscaling). A pool
    # named here is autoscaled and its replica count above is ignored.
    autoscaling: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Expert parallelism (MoE models): ranks (GPUs) per replica of the decode or colocated pool,
    # and of the prefill pool. Each pool has its own degree; 1 is a plain replica.
    expert_parallel_size: int = 1
    prefill_expert_parallel_size: int = 1
    # Tensor parallelism: ranks (GPUs) per replica, each holding a slice of every layer.
    tensor_parallel_size: int = 1
    prefill_tensor_parallel_size: int = 1
    health_check_period_s: float = 5.0  # Serve's health check of each engine replica (3 misses: replaced)
    # A stream whose engine replica dies is continued on another replica this many times at most
    # (router.continuation; 0: the stream ends with an error event).
    max_migrations: int = 3
    # pool ("prefill", "decode") -> seconds a leaving replica may finish its requests before it is
    # stopped (Serve's graceful_shutdown_timeout_s; default DRAIN_TIMEOUT_S). The streams still on
    # it then continue on another replica.
    drain_timeout_s: dict[str, float] = field(default_factory=dict)
    # Every replica (ingress and engines) runs user code and its handles' routers on Serve's main
    # event loop (LOW_LATENCY_SERVE_ENV): fewer thread hops per request and per streamed token.
    serve_low_latency: bool = True

    def replica_runtime_env(self) -> dict[str, Any]:
        return {"env_vars": dict(LOW_LATENCY_SERVE_ENV)} if self.serve_low_latency else {}

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
        if not isinstance(parsed.tokenize_cache_chars, int) or parsed.tokenize_cache_chars < 0:
            raise ValueError(f"tokenize_cache_chars must be an integer >= 0, got {parsed.tokenize_cache_chars!r}")
        pools = ("prefill", "decode") if parsed.mode == "disaggregated" else ("decode", "colocated")
        if len(set(parsed.autoscaling) & {"decode", "colocated"}) > 1 or set(parsed.autoscaling) - set(pools):
            raise ValueError(f"autoscaling: a {parsed.mode} app has the pools {pools}, got {sorted(parsed.autoscaling)}")
        if not isinstance(parsed.max_migrations, int) or parsed.max_migrations < 0:
            raise ValueError(f"max_migrations must be an integer >= 0, got {parsed.max_migrations!r}")
        if set(parsed.drain_timeout_s) - set(DRAIN_TIMEOUT_S) or not all(
                isinstance(v, (int, float)) and v > 0 for v in parsed.drain_timeout_s.values()):
            raise ValueError(f"drain_timeout_s maps pools {tuple(DRAIN_TIMEOUT_S)} to seconds > 0, "
                             f"got {parsed.drain_timeout_s!r}")
        for kind in ("expert", "tensor"):
            for name in (f"{kind}_parallel_size", f"prefill_{kind}_parallel_size"):
                size = getattr(parsed, name)
                if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                    raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
            if parsed.mode == "colocated" and getattr(parsed, f"prefill_{kind}_parallel_size") != 1:
                raise ValueError(f"prefill_{kind}_parallel_size needs mode 'disaggregated'; a colocated pool's "
                                 f"degree is {kind}_parallel_size")
            if f"{kind}_parallel_size" in parsed.engine_kwargs:
                raise ValueError(f"{kind}_parallel_size is a pool option, not an EngineConfig field: set the app "
                                 f"args {kind}_parallel_size (decode/colocated pool) and "
                                 f"prefill_{kind}_parallel_size")
        for pool, ep, tp in (("decode", parsed.expert_parallel_size, parsed.tensor_parallel_size),
                             ("prefill", parsed.prefill_expert_parallel_size, parsed.prefill_tensor_parallel_size)):
            if ep > 1 and tp > 1:
                raise ValueError(f"the {pool} pool cannot be expert parallel ({ep}) and tensor parallel ({tp}) at "
                                 "once yet; choose one")
        if "prefill_tensor_parallel_size" in parsed.disagg:
            raise ValueError("prefill_tensor_parallel_size is a pool option, not a DisaggConfig field: set the app "
                             "arg prefill_tensor_parallel_size")
        for pool, settings in parsed.autoscaling.items():
            try:
                AutoscalingConfig(**pool_autoscaling_config(pool, settings))  # Serve's own checks, now
            except (TypeError, ValueError) as error:
                raise ValueError(f"autoscaling[{pool!r}]: {error}") from error
        return parsed

    def pool_scaling(self, pool: str, num_replicas: int) -> dict[str, Any]:
        """The deployment options that size `pool`: a fixed count or its autoscaling config."""
        aliases = ("decode", "colocated") if pool in ("decode", "colocated") else (pool,)
        for name in aliases:
            if name in self.autoscaling:
                return {"autoscaling_config": pool_autoscaling_config(pool, self.autoscaling[name])}
        return {"num_replicas": num_replicas}


def _max_model_len(model: str, engine_kwargs: dict[str, Any]) -> int:
    from tandem.engine.model_runner import load_hf_config

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

    def actor_options(pool: str, num_ranks: int) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": args.worker_num_cpus, "num_gpus": num_gpus}
        if args.serve_low_latency:
            opts["runtime_env"] = args.replica_runtime_env()
        if args.pool_resources:
            opts["resources"] = {pool: 1}
        drain_s = args.drain_timeout_s.get(pool, DRAIN_TIMEOUT_S[pool])
        options = {"ray_actor_options": opts, "graceful_shutdown_timeout_s": drain_s,
                   "graceful_shutdown_wait_loop_s": 1.0}
        if num_ranks > 1 and args.device.startswith("cuda") and num_gpus < 1:
            raise ValueError(f"an expert- or tensor-parallel {pool} pool needs one whole GPU per rank (NCCL cannot "
                             f"put two ranks on one GPU); worker_num_gpus is {num_gpus}")
        if num_ranks > 1:  # one bundle per rank, all on one node: the replica in bundle 0
            options["placement_group_bundles"] = [_bundle(opts)] * num_ranks
            options["placement_group_strategy"] = "STRICT_PACK"
        return options

    common = dict(max_ongoing_requests=args.max_ongoing_requests, request_router_config=_router_config(args),
                  health_check_period_s=args.health_check_period_s)

    def deployment(cls, name: str, pool: str, ep_size: int, scaling: dict[str, Any], tp_size: int = 1):
        """A pool's deployment, and the init kwargs its expert- or tensor-parallel degree adds."""
        options = actor_options(pool, max(ep_size, tp_size))
        ep_kwargs: dict[str, Any] = {}
        if ep_size > 1:  # same role, as rank 0 of a group; each rank actor asks what the replica has
            from tandem.workers.ep_replica import EXPERT_PARALLEL_WORKERS

            cls = EXPERT_PARALLEL_WORKERS[cls]
            ep_kwargs = {"expert_parallel_size": ep_size, "rank_actor_options": _rank_actor_options(options)}
        if tp_size > 1:
            from tandem.workers.tp_replica import TENSOR_PARALLEL_WORKERS

            cls = TENSOR_PARALLEL_WORKERS[cls]
            ep_kwargs = {"tensor_parallel_size": tp_size, "rank_actor_options": _rank_actor_options(options)}
        return serve.deployment(cls, name=name).options(**options, **scaling, **common), ep_kwargs

    decode_ep, prefill_ep = args.expert_parallel_size, args.prefill_expert_parallel_size
    if args.mode == "colocated":
        pool, ep_kwargs = deployment(LLMWorker, POOL_DEPLOYMENTS["colocated"], "decode", decode_ep,
                                     args.pool_scaling("colocated", args.num_replicas), args.tensor_parallel_size)
        return pool.bind(model, dict(args.engine_kwargs), args.device, **ep_kwargs)
    from tandem.workers.decode_worker import DecodeWorker
    from tandem.workers.prefill_worker import PrefillWorker

    pool, ep_kwargs = deployment(PrefillWorker, POOL_DEPLOYMENTS["prefill"], "prefill", prefill_ep,
                                 args.pool_scaling("prefill", args.prefill_replicas), args.prefill_tensor_parallel_size)
    prefill = pool.bind(model, dict(args.engine_kwargs), args.device, dict(args.transfer), **ep_kwargs)
    pool, ep_kwargs = deployment(DecodeWorker, POOL_DEPLOYMENTS["decode"], "decode", decode_ep,
                                 args.pool_scaling("decode", args.num_replicas), args.tensor_parallel_size)
    # The decode replicas expect one KV part per prefill rank (`workers.tp_disagg`).
    disagg = {**args.disagg, "prefill_tensor_parallel_size": args.prefill_tensor_parallel_size}
    return pool.bind(model, prefill, dict(args.engine_kwargs), args.device, disagg, dict(args.transfer),
                     **ep_kwargs)


def _bundle(actor_options: dict[str, Any]) -> dict[str, float]:
    """One rank's placement-group bundle: the replica's own resources."""
    bundle = {"CPU": actor_options["num_cpus"], "GPU": actor_options["num_gpus"], **actor_options.get("resources", {})}
    bundle = {name: float(amount) for name, amount in bundle.items() if amount}
    if not bundle:
        raise ValueError("an expert- or tensor-parallel pool reserves one placement-group bundle per rank, and Ray "
                         "needs a non-zero resource in each: set worker_num_cpus or worker_num_gpus > 0")
    return bundle


def check_expert_parallel(args: AppArgs, model: str) -> None:
    """Each pool's degree against the model (ValueError: dense model, more ranks than experts);
    at build time, so a bad degree never reaches a replica."""
    from tandem.workers.ep_replica import check_expert_parallel_size

    pools = {"expert_parallel_size": args.expert_parallel_size}
    if args.mode == "disaggregated":
        pools["prefill_expert_parallel_size"] = args.prefill_expert_parallel_size
    for name, size in pools.items():
        try:
            check_expert_parallel_size(model, size)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def check_tensor_parallel(args: AppArgs, model: str) -> None:
    """Each pool's degree against the model's shapes (heads, KV heads, intermediate size)."""
    from tandem.workers.tp_replica import check_tensor_parallel_size

    for name in ("tensor_parallel_size", "prefill_tensor_parallel_size"):
        try:
            check_tensor_parallel_size(model, getattr(args, name))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def ingress_config(parsed: AppArgs, model: str) -> IngressConfig:
    return IngressConfig(
        model=model,
        served_model_name=parsed.served_model_name or parsed.model or "tandem-tiny-llama",
        max_model_len=_max_model_len(model, parsed.engine_kwargs),
        api_key=parsed.api_key or None,
        max_in_flight=parsed.max_in_flight,
        max_n=parsed.max_n,
        max_body_bytes=parsed.max_body_bytes,
        tokenize_cache_chars=parsed.tokenize_cache_chars,
        engine_deployments=tuple(POOL_DEPLOYMENTS[pool] for pool in  # what /health waits for
                                 (("colocated",) if parsed.mode == "colocated" else ("prefill", "decode"))),
        max_migrations=parsed.max_migrations,
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    parsed = AppArgs.from_dict(args)
    if parsed.model:
        model = parsed.model
    else:
        from tandem.engine.make_model import default_model

        model = default_model()
    check_expert_parallel(parsed, model)
    check_tensor_parallel(parsed, model)
    config = ingress_config(parsed, model)
    return OpenAIIngress.options(
        num_replicas=parsed.ingress_replicas,
        # Above the ingress's own bound, so the excess reaches it and gets a 429 instead of
        # waiting in the proxy's queue.
        max_ongoing_requests=parsed.max_in_flight + 64,
        ray_actor_options={"num_cpus": parsed.ingress_num_cpus,
                           **({"runtime_env": parsed.replica_runtime_env()} if parsed.serve_low_latency else {})},
    ).bind(_decode_pool(parsed, model), config)


def _rank_actor_options(options: dict) -> dict:
    """A rank actor's Ray options: the replica's, less Serve's replica knobs (runtime_env), which
    are for Serve replicas, not for a plain actor."""
    return {k: v for k, v in options["ray_actor_options"].items() if k != "runtime_env"}
