"""`tandem bench compare A.json B.json`: two reports side by side, with B/A ratios.

Stages are paired by offered load when both reports have the same loads, else by position.
Ratio above 1 means B is larger: better for throughput, worse for latency (the `better` column
says which way each row points)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# (label, path into a stage summary, "higher"/"lower" is better)
_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("requests/s", ("request_throughput",), "higher"),
    ("output tok/s", ("output_token_throughput",), "higher"),
    ("input tok/s", ("input_token_throughput",), "higher"),
    ("goodput req/s", ("goodput_rps",), "higher"),
    ("failed", ("failed",), "lower"),
    *((f"{metric.upper()} {q} ms", ("latency", f"{metric}_ms", q), "lower")
      for metric in ("ttft", "tpot", "itl", "e2e") for q in ("mean", "p50", "p90", "p99")),
)


@dataclass(frozen=True)
class ComparedRow:
    stage: str
    metric: str
    a: float | None
    b: float | None
    better: str

    @property
    def ratio(self) -> float | None:
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a


def _dig(tree: object, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(tree, dict) or tree.get(key) is None:
            return None
        tree = tree[key]
    return float(tree) if isinstance(tree, (int, float)) else None


def compare_reports(path_a: Path, path_b: Path) -> tuple[str, str, list[ComparedRow]]:
    report_a, report_b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    stages_a, stages_b = report_a["stages"], report_b["stages"]
    loads_a = [stage["summary"]["offered_load"] for stage in stages_a]
    loads_b = [stage["summary"]["offered_load"] for stage in stages_b]
    if sorted(loads_a) == sorted(loads_b) and len(set(loads_a)) == len(loads_a):
        pairs = [(a, stages_b[loads_b.index(load)]) for a, load in zip(stages_a, loads_a)]
    else:
        pairs = list(zip(stages_a, stages_b))
    rows = []
    for stage_a, stage_b in pairs:
        name = f"{stage_a['summary']['offered_load']:g}"
        if stage_b["summary"]["offered_load"] != stage_a["summary"]["offered_load"]:
            name += f" vs {stage_b['summary']['offered_load']:g}"
        for label, path, better in _ROWS:
            rows.append(ComparedRow(name, label, _dig(stage_a["summary"], path), _dig(stage_b["summary"], path), better))
        rows.append(ComparedRow(name, "prefix hit rate", _dig(stage_a, ("server", "prefix_cache_hit_rate")),
                                _dig(stage_b, ("server", "prefix_cache_hit_rate")), "higher"))
    return report_a["run"]["label"], report_b["run"]["label"], rows


def render_comparison(label_a: str, label_b: str, rows: list[ComparedRow]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:,.2f}"

    lines = [f"| load | metric | A: {label_a} | B: {label_b} | B/A | better |",
             "| ---: | --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        if row.a is None and row.b is None:
            continue
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"| {row.stage} | {row.metric} | {cell(row.a)} | {cell(row.b)} | {ratio} | {row.better} |")
    return "\n".join(lines) + "\n"
