"""Engine counters for the ingress's `GET /metrics`: a per-app stats board and the Prometheus text.

Workers are Serve replicas and a handle call reaches only one of them, so each worker pushes
its `EngineStats` (as a plain dict) to one named actor per app, `tandem-stats:<app>`, every
fraction of a second; the ingress reads the board and renders Prometheus text with a
`replica` label, under both `tandem_*` and vLLM's `vllm:*` names (so dashboards and
`tandem bench` read either). Like the prefix index it is a view: a restarted board refills
from the next reports, and a replica that stops reporting drops out after `stale_after_s`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from tandem.router.stage_timing import StageHistograms

logger = logging.getLogger("ray.serve")

STATS_NAMESPACE = "tandem"


def stats_board_name(app_name: str) -> str:
    return f"tandem-stats:{app_name}"


REPLICA_ID_PREFIX = "SERVE_REPLICA::"  # Serve's full replica id: SERVE_REPLICA::app#Deployment#id


def replica_deployment(replica_id: str) -> tuple[str, str]:
    """(app, deployment) of a board key (Serve's full replica id); deployment "" if it is not one."""
    app, _, rest = replica_id.removeprefix(REPLICA_ID_PREFIX).partition("#")
    return app, rest.rpartition("#")[0]


@ray.remote(num_cpus=0, max_restarts=-1)
class StatsBoard:
    """The latest stats dict per replica id."""

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self._stale_after_s = stale_after_s
        self._reports: dict[str, tuple[dict, float]] = {}

    def report(self, replica_id: str, stats: dict, timestamp: float) -> None:
        if isinstance(replica_id, str) and isinstance(stats, dict):
            self._reports[replica_id] = (stats, float(timestamp))

    def snapshot(self) -> dict[str, dict]:
        now = time.time()
        self._reports = {r: v for r, v in self._reports.items() if now - v[1] <= self._stale_after_s}
        return {replica_id: stats for replica_id, (stats, _) in self._reports.items()}


def get_stats_board(app_name: str) -> ray.actor.ActorHandle:
    board = StatsBoard.options(
        name=stats_board_name(app_name), namespace=STATS_NAMESPACE, get_if_exists=True, lifetime="detached",
    ).remote()
    _register_cleanup(board)
    return board


def _register_cleanup(actor: ray.actor.ActorHandle) -> None:
    # Detached, so it outlives any one replica; the Serve controller kills it on
    # serve.shutdown() (best effort: a private Serve method, as the request router uses).
    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        controller._register_shutdown_cleanup_actor.remote(actor)
    except Exception as error:
        logger.debug("could not register the stats board for cleanup: %r", error)


@dataclass(frozen=True)
class _Metric:
    field: str  # EngineStats field
    kind: str  # "counter" | "gauge"
    help: str
    names: tuple[str, ...]  # exported names (counters get `_total` here already)


_METRICS = (
    _Metric("prompt_tokens_total", "counter", "Prompt tokens admitted.",
            ("tandem_prompt_tokens_total", "vllm:prompt_tokens_total")),
    _Metric("generation_tokens_total", "counter", "Tokens generated.",
            ("tandem_generation_tokens_total", "vllm:generation_tokens_total")),
    _Metric("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache.",
            ("tandem_prefix_cache_queries_total", "vllm:prefix_cache_queries_total")),
    _Metric("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache.",
            ("tandem_prefix_cache_hits_total", "vllm:prefix_cache_hits_total")),
    _Metric("num_preemptions", "counter", "Sequences preempted.",
            ("tandem_num_preemptions_total", "vllm:num_preemptions_total")),
    _Metric("num_running", "gauge", "Sequences running.", ("tandem_num_requests_running", "vllm:num_requests_running")),
    _Metric("num_waiting", "gauge", "Sequences waiting.", ("tandem_num_requests_waiting", "vllm:num_requests_waiting")),
    _Metric("kv_usage", "gauge", "Fraction of KV blocks in use.", ("tandem_kv_cache_usage_perc", "vllm:kv_cache_usage_perc")),
    _Metric("num_free_blocks", "gauge", "Free KV blocks.", ("tandem_kv_free_blocks",)),
    _Metric("num_total_blocks", "gauge", "KV blocks in the cache.", ("tandem_kv_total_blocks",)),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(per_replica: dict[str, dict], model_name: str, ingress: dict[str, float],
                      stage_histograms: StageHistograms | None = None) -> str:
    """Prometheus text for every replica's engine stats plus this ingress's own counters and,
    when given, its serving-path stage histograms."""
    lines: list[str] = []
    model = _escape(model_name)
    for metric in _METRICS:
        for name in metric.names:
            lines.append(f"# HELP {name} {metric.help}")
            lines.append(f"# TYPE {name} {metric.kind}")
            for replica_id in sorted(per_replica):
                value = per_replica[replica_id].get(metric.field)
                if isinstance(value, (int, float)):
                    lines.append(f'{name}{{model_name="{model}",replica="{_escape(replica_id)}"}} {float(value)}')
    for name, value in sorted(ingress.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{model_name="{model}"}} {float(value)}')
    if stage_histograms is not None:
        lines += stage_histograms.render(f'model_name="{model}"')
    return "\n".join(lines) + "\n"
