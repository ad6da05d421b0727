"""A worker's metrics, exported the Ray way (`ray.util.metrics`), under names vLLM users know.

`WorkerMetrics` owns one replica's series. The worker's publish loop hands it the snapshots it
already reads (`EngineStats`, the `kvtransfer` `TransferMetrics`, the decode side's
`DisaggCounters`, the MoE model's `ExpertLoadStats`) a few times a second; gauges are set and
counters advance by the difference from the previous snapshot. Nothing runs per token: the
engine keeps plain integer counters and this module reads them.

Names. Ray's metric names follow Prometheus' rule (`[a-zA-Z_:][a-zA-Z0-9_:]*`) but warn that
':' will become an error, and Ray's exporter prefixes every custom metric with `ray_`. So vLLM's
`vllm:<name>` is exported here as `vllm_<name>`, which Prometheus shows as `ray_vllm_<name>`
(the ingress's own `/metrics` keeps the literal `vllm:*` names, see `router.openai_metrics`).
Counters end in `_total`, which Ray keeps as is. Every series carries the tags `model_name`,
`pool` (`colocated` | `prefill` | `decode`) and `replica`; docs/DISAGG.md has the table.

`samples()` returns what this object exported (cumulative for counters, last value for gauges),
so tests and the worker's `metric_samples()` read the real exported values, not a copy.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray.util import metrics as ray_metrics

if TYPE_CHECKING:
    from tandem.kvtransfer.metrics import TransferMetrics
    from tandem.workers.disagg import DisaggCounters
    from tandem.protocol.worker import EngineStats
    from tandem.engine.models.moe import ExpertLoadStats

BASE_TAGS = ("model_name", "pool", "replica")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as given to ray.util.metrics (Prometheus adds the `ray_` prefix)
    kind: str  # "gauge" | "counter"
    help: str
    vllm_name: str = ""  # the vLLM name it stands for, where there is one
    extra_tags: tuple[str, ...] = ()


def _gauge(name: str, help: str, vllm_name: str = "") -> MetricSpec:
    return MetricSpec(name, "gauge", help, vllm_name)


def _counter(name: str, help: str, vllm_name: str = "", extra_tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "counter", help, vllm_name, extra_tags)


# EngineStats field -> spec
ENGINE_GAUGES = {
    "num_running": _gauge("vllm_num_requests_running", "Sequences in the running batch.",
                          "vllm:num_requests_running"),
    "num_waiting": _gauge("vllm_num_requests_waiting", "Sequences waiting to be scheduled.",
                          "vllm:num_requests_waiting"),
    "kv_usage": _gauge("vllm_kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).",
                       "vllm:kv_cache_usage_perc"),
    "num_free_blocks": _gauge("tandem_kv_free_blocks", "Free KV blocks."),
    "num_total_blocks": _gauge("tandem_kv_total_blocks", "KV blocks in the cache."),
}
ENGINE_COUNTERS = {
    "prompt_tokens_total": _counter("vllm_prompt_tokens_total", "Prompt tokens admitted.",
                                    "vllm:prompt_tokens_total"),
    "generation_tokens_total": _counter("vllm_generation_tokens_total", "Tokens generated.",
                                        "vllm:generation_tokens_total"),
    "prefix_cache_queries": _counter("vllm_prefix_cache_queries_total",
                                     "Prompt tokens looked up in the prefix cache.",
                                     "vllm:prefix_cache_queries"),
    "prefix_cache_hits": _counter("vllm_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                                  "vllm:prefix_cache_hits"),
    "num_preemptions": _counter("vllm_num_preemptions_total", "Sequences preempted.",
                                "vllm:num_preemptions"),
}
PREFIX_HIT_RATE = _gauge("tandem_prefix_cache_hit_rate", "Prefix-cache hits / queries since start (tokens).",
                         "vllm:gpu_prefix_cache_hit_rate")
QUEUED_PREFILL_TOKENS = _gauge("tandem_queued_prefill_tokens",
                               "Prompt tokens not yet prefilled (waiting + partially prefilled sequences).")
REMOTE_PREFILLING = _gauge("tandem_num_requests_remote_prefilling",
                           "Decode: sequences waiting for their KV from the prefill pool.")

# The host tier of the prefix cache (EngineStats.host_*), exported only where it is on
HOST_GAUGES = {
    "host_kv_usage": _gauge("tandem_host_kv_usage_perc", "Fraction of host-tier KV blocks holding a cached block (0..1)."),
    "host_kv_total_blocks": _gauge("tandem_host_kv_total_blocks", "KV blocks in the host tier."),
    "num_loading_from_host": _gauge("tandem_num_requests_loading_from_host",
                                    "Sequences waiting off the batch for their prefix to be copied back from the host tier."),
}
HOST_HITS = _counter("tandem_prefix_cache_host_hits_total",
                     "Prompt tokens copied back from the host tier instead of recomputed.")
HOST_HIT_RATE = _gauge("tandem_prefix_cache_host_hit_rate", "Host-tier hits / prefix-cache queries since start (tokens).")
HOST_COPY_BYTES = _counter("tandem_host_kv_copy_bytes_total", "KV bytes copied between device and host tier.",
                           extra_tags=("direction",))
HOST_COPY_SECONDS = _counter("tandem_host_kv_copy_seconds_total", "Sum of host-tier copies' own durations.",
                             extra_tags=("direction",))
HOST_OFFLOADS_SKIPPED = _counter("tandem_host_kv_offloads_skipped_total",
                                 "Steps whose eviction candidates were not copied out (host tier busy or full).")

# TransferMetrics, per direction ("sent" on the prefill side, "received" on the decode side)
TRANSFER_BYTES = _counter("tandem_kv_transfer_bytes_total", "KV bytes moved.", extra_tags=("direction",))
TRANSFER_SECONDS = _counter("tandem_kv_transfer_seconds_total",
                            "Sum of successful transfers' durations (begin to landed/acknowledged).",
                            extra_tags=("direction",))
TRANSFERS = _counter("tandem_kv_transfers_total", "Successful KV transfers.", extra_tags=("direction",))
TRANSFER_FAILURES = _counter("tandem_kv_transfer_failures_total", "Failed KV transfers.",
                             extra_tags=("direction",))
# DisaggCounters (decode side)
REMOTE_PREFILLS = _counter("tandem_remote_prefills_total", "Remote prefills ended, by outcome (ok | failed).",
                           extra_tags=("outcome",))
REMOTE_PREFILL_TOKENS = _counter("tandem_remote_prefill_tokens_total",
                                 "Prompt tokens whose KV came from the prefill pool.")
# ExpertLoadStats (MoE models)
EXPERT_TOKENS = _counter("tandem_moe_expert_tokens_total", "Tokens routed to each expert (this rank's tokens).",
                         extra_tags=("layer", "expert"))

ALL_SPECS = (*ENGINE_GAUGES.values(), *ENGINE_COUNTERS.values(), PREFIX_HIT_RATE, QUEUED_PREFILL_TOKENS,
             *HOST_GAUGES.values(), HOST_HITS, HOST_HIT_RATE, HOST_COPY_BYTES, HOST_COPY_SECONDS, HOST_OFFLOADS_SKIPPED,
             REMOTE_PREFILLING, TRANSFER_BYTES, TRANSFER_SECONDS, TRANSFERS, TRANSFER_FAILURES,
             REMOTE_PREFILLS, REMOTE_PREFILL_TOKENS, EXPERT_TOKENS)


@functools.lru_cache(maxsize=None)
def _ray_metric(spec: MetricSpec):
    """One Ray metric object per name and process (several workers in one process share it)."""
    tag_keys = BASE_TAGS + spec.extra_tags
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.help, tag_keys)
    return ray_metrics.Counter(spec.name, spec.help, tag_keys)


def series_key(spec: MetricSpec, **extra: str) -> str:
    """`name` or `name{k=v,...}` (extra tags only, sorted): how `samples()` names a series."""
    if not extra:
        return spec.name
    return spec.name + "{" + ",".join(f"{k}={extra[k]}" for k in sorted(extra)) + "}"


class WorkerMetrics:
    """One replica's exported series. Call the `update_*` methods from one task at a time (the
    worker's publish loop); `samples()` may be read from anywhere."""

    def __init__(self, pool: str, replica_id: str, model_name: str) -> None:
        self.tags = {"model_name": model_name, "pool": pool, "replica": replica_id}
        self._lock = threading.Lock()
        self._samples: dict[str, float] = {}  # series key -> exported value
        self._last_cumulative: dict[str, float] = {}  # series key -> the source's last reading

    # ------------------------------------------------------------------ sources
    def update_engine(self, stats: EngineStats, queued_prefill_tokens: int | None = None) -> None:
        for field_name, spec in ENGINE_GAUGES.items():
            self._set(spec, float(getattr(stats, field_name)))
        for field_name, spec in ENGINE_COUNTERS.items():
            self._advance(spec, float(getattr(stats, field_name)))
        queries = stats.prefix_cache_queries
        self._set(PREFIX_HIT_RATE, stats.prefix_cache_hits / queries if queries else 0.0)
        if queued_prefill_tokens is not None:
            self._set(QUEUED_PREFILL_TOKENS, float(queued_prefill_tokens))
        if stats.host_kv_total_blocks:
            self._update_host_tier(stats)

    def _update_host_tier(self, stats: EngineStats) -> None:
        """`direction`: `offload` (device -> host) and `reload` (host -> device)."""
        for field_name, spec in HOST_GAUGES.items():
            self._set(spec, float(getattr(stats, field_name)))
        self._advance(HOST_HITS, float(stats.host_cache_hits))
        queries = stats.prefix_cache_queries
        self._set(HOST_HIT_RATE, stats.host_cache_hits / queries if queries else 0.0)
        self._advance(HOST_COPY_BYTES, float(stats.host_bytes_offloaded), direction="offload")
        self._advance(HOST_COPY_BYTES, float(stats.host_bytes_reloaded), direction="reload")
        self._advance(HOST_COPY_SECONDS, stats.host_offload_seconds, direction="offload")
        self._advance(HOST_COPY_SECONDS, stats.host_reload_seconds, direction="reload")
        self._advance(HOST_OFFLOADS_SKIPPED, float(stats.host_offloads_skipped))

    def update_transfer(self, transfer: TransferMetrics, direction: str) -> None:
        moved = transfer.bytes_sent if direction == "sent" else transfer.bytes_received
        self._advance(TRANSFER_BYTES, float(moved), direction=direction)
        self._advance(TRANSFER_SECONDS, transfer.transfer_seconds, direction=direction)
        self._advance(TRANSFERS, float(transfer.transfers_ok), direction=direction)
        self._advance(TRANSFER_FAILURES, float(transfer.transfers_failed), direction=direction)

    def update_disagg(self, counters: DisaggCounters, num_waiting_for_kv: int) -> None:
        self._set(REMOTE_PREFILLING, float(num_waiting_for_kv))
        self._advance(REMOTE_PREFILLS, float(counters.remote_prefills_ok), outcome="ok")
        self._advance(REMOTE_PREFILLS, float(counters.remote_prefills_failed), outcome="failed")
        self._advance(REMOTE_PREFILL_TOKENS, float(counters.remote_prefill_tokens))

    def update_expert_load(self, load: ExpertLoadStats) -> None:
        """Advances only the (layer, expert) series whose count moved; hot experts are the
        fastest-growing ones (`topk(rate(ray_tandem_moe_expert_tokens_total[1m]))`)."""
        for layer, row in zip(load.moe_layers, load.cumulative):
            for expert, count in enumerate(row):
                if count:
                    self._advance(EXPERT_TOKENS, float(count), layer=str(layer), expert=str(expert))

    # ------------------------------------------------------------------ reading
    def samples(self) -> dict[str, float]:
        """Every series this object exported: counters cumulative, gauges their last value."""
        with self._lock:
            return dict(self._samples)

    def value(self, spec: MetricSpec, **extra: str) -> float:
        return self.samples().get(series_key(spec, **extra), 0.0)

    # ------------------------------------------------------------------ recording
    def _set(self, spec: MetricSpec, value: float, **extra: str) -> None:
        key = series_key(spec, **extra)
        if self._samples.get(key) == value:
            return
        _ray_metric(spec).set(value, tags={**self.tags, **extra})
        with self._lock:
            self._samples[key] = value

    def _advance(self, spec: MetricSpec, cumulative: float, **extra: str) -> None:
        """A counter follows a source's cumulative count. A source that went backwards was reset
        (e.g. `ExpertLoadRecorder.reset`): its new count is all new."""
        key = series_key(spec, **extra)
        last = self._last_cumulative.get(key, 0.0)
        delta = cumulative - last if cumulative >= last else cumulative
        self._last_cumulative[key] = cumulative
        if delta <= 0:
            return
        _ray_metric(spec).inc(delta, tags={**self.tags, **extra})
        with self._lock:
            self._samples[key] = self._samples.get(key, 0.0) + delta
