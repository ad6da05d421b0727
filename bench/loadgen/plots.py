"""PNG plots with matplotlib (Agg backend, no display needed): latency CDFs per stage, and for
a sweep, throughput and latency against offered load."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from tandem.bench.loadgen.request import RequestResult  # noqa: E402
from tandem.bench.loadgen.stats import StageSummary  # noqa: E402


def _cdf(axis: plt.Axes, values_ms: Sequence[float], label: str) -> None:
    if not values_ms:
        return
    xs = np.sort(np.asarray(values_ms))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    axis.step(xs, ys, where="post", label=label)


def plot_latency_cdfs(stages: Sequence[tuple[StageSummary, Sequence[RequestResult]]], path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        ("TTFT", lambda rs: [r.ttft_s * 1e3 for r in rs if r.ttft_s is not None]),
        ("ITL", lambda rs: [gap * 1e3 for r in rs for gap in r.itl_s]),
        ("TPOT", lambda rs: [t * 1e3 for r in rs if (t := r.tpot_s) is not None]),
        ("E2E", lambda rs: [r.e2e_s * 1e3 for r in rs if r.e2e_s is not None]),
    )
    for axis, (title, values) in zip(axes.flat, panels):
        for summary, results in stages:
            measured_ok = [r for r in results if not r.warmup and r.ok]
            _cdf(axis, values(measured_ok), f"{summary.label} ({summary.offered_load:g})")
        axis.set_title(f"{title} CDF")
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests" if title != "ITL" else "fraction of gaps")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sweep(summaries: Sequence[StageSummary], path: Path, load_name: str) -> None:
    loads = [s.offered_load for s in summaries]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(loads, [s.output_token_throughput for s in summaries], "o-", label="output tok/s")
    left.set_xlabel(load_name)
    left.set_ylabel("output tokens / s")
    twin = left.twinx()
    twin.plot(loads, [s.request_throughput for s in summaries], "s--", color="tab:orange", label="req/s")
    if all(s.goodput_rps is not None for s in summaries):
        twin.plot(loads, [s.goodput_rps for s in summaries], "^:", color="tab:green", label="goodput req/s")
    twin.set_ylabel("requests / s")
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    left.set_title("throughput vs load")
    left.grid(alpha=0.3)
    for metric, style in (("ttft_ms", "o-"), ("tpot_ms", "s-"), ("itl_ms", "^-")):
        for quantile in ("p50", "p99"):
            ys = [getattr(getattr(s.latency, metric), quantile) if getattr(s.latency, metric) else np.nan for s in summaries]
            right.plot(loads, ys, style, alpha=1.0 if quantile == "p99" else 0.5, label=f"{metric[:-3].upper()} {quantile}")
    right.set_xlabel(load_name)
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.set_title("latency vs load")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
