"""Statistics of a stage: distributions (mean, p50/p90/p99) of TTFT, ITL, TPOT and E2E,
throughput over the measured window, goodput against SLOs, errors by kind.

Definitions (the same as vLLM's benchmark_serving): TTFT is request start to the first token's
chunk (even if its text is empty; not a chat stream's opening role chunk); ITL is each gap
between consecutive token chunks; TPOT is (E2E - TTFT) / (output
tokens - 1) per request, with output tokens from the server's `usage`; E2E is start to the end
of the stream. The measured window runs from the first measured request's start to the last
one's end. Requests without `usage` are counted (`usage_missing`) and left out of token counts
and TPOT rather than estimated.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.bench.loadgen.request import RequestResult

SLO_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def distribution(values: Sequence[float]) -> Distribution | None:
    if len(values) == 0:
        return None
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return Distribution(len(array), float(array.mean()), float(p50), float(p90), float(p99),
                        float(array.min()), float(array.max()))


@dataclass(frozen=True)
class Slo:
    """A per-request limit: `ttft_ms`, `tpot_ms`, `e2e_ms`, or `itl_ms` (the request's largest
    inter-token gap)."""

    metric: str
    limit_ms: float

    @staticmethod
    def parse(text: str) -> Slo:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO {text!r}: expected one of {', '.join(SLO_METRICS)} as name=milliseconds")
        return Slo(name, float(value))

    def value_ms(self, result: RequestResult) -> float | None:
        if self.metric == "ttft_ms":
            seconds = result.ttft_s
        elif self.metric == "tpot_ms":
            seconds = result.tpot_s
        elif self.metric == "e2e_ms":
            seconds = result.e2e_s
        else:
            seconds = max(result.itl_s) if result.itl_s else (0.0 if result.ok and result.ttft_s is not None else None)
        return None if seconds is None else seconds * 1e3

    def met(self, result: RequestResult) -> bool:
        """False for failed requests and for unknown values (e.g. TPOT without usage)."""
        value = self.value_ms(result)
        return result.ok and value is not None and value <= self.limit_ms


@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds."""

    ttft_ms: Distribution | None
    itl_ms: Distribution | None
    tpot_ms: Distribution | None
    e2e_ms: Distribution | None


def latency_summary(results: Sequence[RequestResult]) -> LatencySummary:
    ok = [r for r in results if r.ok]
    return LatencySummary(
        ttft_ms=distribution([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        itl_ms=distribution([gap * 1e3 for r in ok for gap in r.itl_s]),
        tpot_ms=distribution([tpot * 1e3 for r in ok if (tpot := r.tpot_s) is not None]),
        e2e_ms=distribution([r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]),
    )


@dataclass(frozen=True)
class StageSummary:
    label: str
    arrival: str
    offered_load: float
    requests_sent: int  # warm-up included
    warmup_requests: int
    measured_requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    usage_missing: int  # succeeded requests whose stream carried no usage
    no_output: int  # succeeded requests that streamed no content at all
    window_s: float
    request_throughput: float  # measured successful requests / s
    input_token_throughput: float
    output_token_throughput: float
    input_tokens_from_usage: int  # requests whose input count is the server's (else our estimate)
    latency: LatencySummary
    slos: tuple[Slo, ...] = ()
    goodput_rps: float | None = None  # requests / s meeting every SLO
    slo_attainment: float | None = None  # fraction of measured requests meeting every SLO
    by_kind: dict[str, LatencySummary] = field(default_factory=dict)


def summarize(label: str, arrival: str, offered_load: float, results: Sequence[RequestResult],
              slos: Sequence[Slo] = ()) -> StageSummary:
    measured = [r for r in results if not r.warmup]
    ok = [r for r in measured if r.ok]
    if measured:
        window_s = max(r.end_s for r in measured) - min(r.start_s for r in measured)
    else:
        window_s = 0.0
    per_s = (1.0 / window_s) if window_s > 0 else 0.0
    errors = Counter(r.error_kind for r in measured if r.error_kind is not None)
    goodput_rps = slo_attainment = None
    if slos:
        good = sum(all(slo.met(r) for slo in slos) for r in measured)
        goodput_rps = good * per_s
        slo_attainment = good / len(measured) if measured else 0.0
    kinds = sorted({r.kind for r in measured})
    by_kind = {kind: latency_summary([r for r in measured if r.kind == kind]) for kind in kinds} if len(kinds) > 1 else {}
    return StageSummary(
        label=label, arrival=arrival, offered_load=offered_load,
        requests_sent=len(results), warmup_requests=len(results) - len(measured),
        measured_requests=len(measured), succeeded=len(ok), failed=len(measured) - len(ok),
        errors=dict(sorted(errors.items())),
        usage_missing=sum(r.output_tokens is None for r in ok),
        no_output=sum(r.ttft_s is None for r in ok),
        window_s=window_s,
        request_throughput=len(ok) * per_s,
        input_token_throughput=sum(r.input_tokens for r in ok) * per_s,
        output_token_throughput=sum(r.output_tokens or 0 for r in ok) * per_s,
        input_tokens_from_usage=sum(r.prompt_tokens is not None for r in ok),
        latency=latency_summary(measured),
        slos=tuple(slos), goodput_rps=goodput_rps, slo_attainment=slo_attainment,
        by_kind=by_kind,
    )
