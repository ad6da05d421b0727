"""The benchmark's outputs: `report.json` (everything, machine-readable; what `compare` reads)
and `report.md` (the same, for people)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.bench.loadgen.request import RequestResult
from tandem.bench.loadgen.server_metrics import ServerMetricsDelta
from tandem.bench.loadgen.stats import Distribution, LatencySummary, StageSummary

REPORT_VERSION = 1


@dataclass(frozen=True)
class RunInfo:
    label: str
    url: str
    endpoint: str
    model: str
    workload: str
    token_counting: str
    arrival: str
    seed: int
    num_requests: int | None
    duration_s: float | None
    warmup_requests: int
    started_at: str  # ISO 8601, UTC
    command: str
    max_model_len: int | None = None  # the served model's context length (its /v1/models card), if known


@dataclass(frozen=True)
class RequestRecord:
    """One request in report.json (no prompt text, no per-gap list: those stay in memory)."""

    index: int
    kind: str
    conversation_id: str | None
    turn_index: int
    warmup: bool
    start_s: float
    ttft_ms: float | None
    e2e_ms: float | None
    tpot_ms: float | None
    max_itl_ms: float | None
    prompt_tokens: int | None
    input_tokens_estimate: int
    output_tokens: int | None
    output_chunks: int
    error_kind: str | None
    error_detail: str | None

    @staticmethod
    def of(result: RequestResult) -> RequestRecord:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 3)

        return RequestRecord(
            result.request_index, result.kind, result.conversation_id, result.turn_index, result.warmup,
            round(result.start_s, 6), ms(result.ttft_s), ms(result.e2e_s), ms(result.tpot_s),
            ms(max(result.itl_s)) if result.itl_s else None, result.prompt_tokens,
            result.input_tokens_estimate, result.output_tokens, result.output_chunks,
            result.error_kind, result.error_detail,
        )


@dataclass(frozen=True)
class StageReport:
    summary: StageSummary
    server: ServerMetricsDelta | None
    requests: tuple[RequestRecord, ...]
    requests_over_context: int = 0  # not sent: prompt + max_tokens would not fit the model's context


@dataclass(frozen=True)
class BenchReport:
    run: RunInfo
    stages: tuple[StageReport, ...]
    version: int = REPORT_VERSION


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(report), indent=1) + "\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(dist: Distribution | None) -> str:
    return "-" if dist is None else f"{dist.p50:,.1f} / {dist.p99:,.1f}"


def _latency_table(latency: LatencySummary) -> list[str]:
    lines = ["| metric (ms) | count | mean | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        dist: Distribution | None = getattr(latency, name)
        if dist is None:
            lines.append(f"| {name[:-3].upper()} | 0 | - | - | - | - | - |")
        else:
            lines.append(f"| {name[:-3].upper()} | {dist.count} | {dist.mean:,.1f} | {dist.p50:,.1f} | "
                         f"{dist.p90:,.1f} | {dist.p99:,.1f} | {dist.max:,.1f} |")
    return lines


def render_markdown(report: BenchReport, plot_files: Sequence[str] = ()) -> str:
    run = report.run
    bound = " and ".join(filter(None, [
        f"{run.num_requests} requests" if run.num_requests is not None else "",
        f"{run.duration_s:g} s" if run.duration_s is not None else ""]))
    lines = [
        f"# tandem bench: {run.label}", "",
        f"- endpoint: `{run.url}` ({run.endpoint}), model `{run.model}`",
        f"- workload: {run.workload}",
        f"- prompt lengths counted by: {run.token_counting}",
        f"- the model's context: {run.max_model_len} tokens (from /v1/models)" if run.max_model_len
        else "- the model's context: unknown (its /v1/models card has no max_model_len); requests are not sized to it",
        f"- arrivals: {run.arrival}; bound: {bound}; warm-up: {run.warmup_requests} requests (excluded); seed {run.seed}",
        f"- started {run.started_at}; command: `{run.command}`", "",
        "## Summary", "",
        "| load | ok / failed | req/s | in tok/s | out tok/s | goodput req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms | E2E p50/p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage in report.stages:
        s = stage.summary
        lines.append(
            f"| {s.offered_load:g} | {s.succeeded} / {s.failed} | {s.request_throughput:,.2f} | "
            f"{s.input_token_throughput:,.0f} | {s.output_token_throughput:,.0f} | {_fmt(s.goodput_rps, 2)} | "
            f"{_pair(s.latency.ttft_ms)} | {_pair(s.latency.tpot_ms)} | {_pair(s.latency.itl_ms)} | {_pair(s.latency.e2e_ms)} |")
    for stage in report.stages:
        s = stage.summary
        lines += ["", f"## {s.label}: {s.arrival}", "",
                  f"{s.measured_requests} measured requests ({s.succeeded} ok, {s.failed} failed) over {s.window_s:.2f} s; "
                  f"{s.warmup_requests} warm-up requests excluded.", ""]
        lines += _latency_table(s.latency)
        if s.slos:
            limits = ", ".join(f"{slo.metric} <= {slo.limit_ms:g}" for slo in s.slos)
            lines += ["", f"Goodput ({limits}): {_fmt(s.goodput_rps, 2)} req/s; "
                          f"{_fmt((s.slo_attainment or 0) * 100)}% of measured requests met every SLO."]
        if s.errors:
            lines += ["", "Errors by kind: " + ", ".join(f"`{kind}` {count}" for kind, count in s.errors.items())]
            details = sorted({r.error_detail or "" for r in stage.requests if r.error_kind and not r.warmup})
            lines += [f"  - {detail[:160]}" for detail in details[:5]]
        notes = []
        if s.usage_missing:
            notes.append(f"{s.usage_missing} successful requests came back without `usage`: their output tokens are "
                         "unknown, so they are left out of token throughput and TPOT (not estimated).")
        if s.no_output:
            notes.append(f"{s.no_output} successful requests streamed no content.")
        if stage.requests_over_context:
            notes.append(f"{stage.requests_over_context} requests were not sent: their prompt and max_tokens would "
                         f"not fit the model's context ({run.max_model_len} tokens); a conversation ends at its first "
                         "such turn.")
        if s.input_tokens_from_usage < s.succeeded:
            notes.append(f"input tokens of {s.succeeded - s.input_tokens_from_usage} requests are our own estimate "
                         f"({run.token_counting}); the rest are the server's `usage.prompt_tokens`.")
        if notes:
            lines += ["", "Notes:"] + [f"- {note}" for note in notes]
        if stage.server is not None:
            server = stage.server
            lines += ["", f"Server metrics ({server.note}):"]
            if server.prefix_cache_queries is not None:
                lines.append(f"- prefix cache: {_fmt(server.prefix_cache_hits, 0)} hits / "
                             f"{_fmt(server.prefix_cache_queries, 0)} queried tokens = hit rate "
                             f"{_fmt(None if server.prefix_cache_hit_rate is None else server.prefix_cache_hit_rate * 100)}%")
            if server.kv_transfer_bytes is not None:
                lines.append(f"- KV transferred: {server.kv_transfer_bytes / 2**20:,.1f} MiB")
        for kind, latency in s.by_kind.items():
            lines += ["", f"### requests of kind `{kind}`", ""] + _latency_table(latency)
    if plot_files:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_files]
    return "\n".join(lines) + "\n"


def write_markdown(report: BenchReport, path: Path, plot_files: Sequence[str] = ()) -> None:
    path.write_text(render_markdown(report, plot_files))
