"""Where a request's time to first token goes on the serving path: stage timestamps from the
ingress, its request router and the worker, put on one axis.

The ingress process stamps with `time.perf_counter()` (the request router runs in the same
process, on Serve's router loop, and leaves its stamps in `route_stamps()` under the
`WorkerRequest`'s id); the worker's stamps (`protocol.worker.WorkerTiming`) arrive on the
first delta and are placed by wall clock (`time.time()`), the only clock the two processes share.
`IngressTrace.stamps_ms()` gives every stamp as milliseconds after the ingress received the
request, in path order (`STAMPS`); `intervals_ms()` the time spent reaching each stamp from the
previous one present (`INTERVALS`). The ingress feeds every request's intervals to
`StageHistograms` (Prometheus, at `/metrics`) and, when the request asks with
`"tandem_timing": true`, returns `timing_payload(...)` in the reply.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the request router imports this module; keep the engine out of it
    from tandem.protocol.worker import WorkerTiming

# Path order. Cross-process stamps (worker_*, engine_*, first_token) are placed by wall clock: on
# one host both processes read the same clock; across hosts they are off by the clocks' skew.
STAMPS = (
    "received",  # the ingress handler began (the HTTP proxy hop is before this)
    "body_read",  # the body is in (Serve: the ingress fetches it from the HTTP proxy)
    "parsed",  # JSON and pydantic validation done
    "tokenized",  # chat template applied and tokenized (completions: prompts tokenized)
    "dispatched",  # WorkerRequest built and checked; handed to the pool's DeploymentHandle
    "route_start",  # Serve called TandemRequestRouter.choose_replicas
    "hashed",  # the prompt's block hashes computed
    "routed",  # the prefix index answered: the replica ranking is decided
    "worker_received",  # the worker's generate() began
    "engine_added",  # the engine thread took the request (between steps: waits for a running one)
    "engine_first_step",  # the first engine step after that began
    "first_token",  # the engine handed over the first output (after the steps that prefilled it,
    # and any the scheduler held it back for: the engine does not say when it first scheduled it)
    "worker_first_yield",  # the worker yielded the first delta
    "first_delta",  # the ingress has the first delta
    "first_token_sent",  # the first SSE chunk with a token (or the whole JSON body) goes to the HTTP layer
)

# The interval that ends at each stamp (from the previous stamp present).
INTERVALS = {
    "body_read": "read_body",
    "parsed": "parse",
    "tokenized": "template_tokenize",
    "dispatched": "prepare",
    "route_start": "to_router",
    "hashed": "hash",
    "routed": "route",
    "worker_received": "to_worker",
    "engine_added": "engine_queue",
    "engine_first_step": "engine_wait",
    "first_token": "engine_first_token",
    "worker_first_yield": "worker_out",
    "first_delta": "to_ingress",
    "first_token_sent": "respond",
}
TOTAL = "ingress_total"  # received -> first_token_sent


@dataclass(frozen=True, slots=True)
class RouteStamps:
    """`time.perf_counter()` stamps of one routing decision."""

    started: float
    hashed: float
    routed: float


class _RouteStampBoard:
    """request id -> RouteStamps, written by the request router, taken by the ingress (same
    process, different threads). Bounded: callers that never take theirs (other handles) age out."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._stamps: OrderedDict[str, RouteStamps] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, stamps: RouteStamps) -> None:
        with self._lock:
            previous = self._stamps.pop(request_id, None)
            if previous is not None:  # Serve asked again (replicas were full): keep the first start
                stamps = RouteStamps(previous.started, stamps.hashed, stamps.routed)
            self._stamps[request_id] = stamps
            while len(self._stamps) > self._capacity:
                self._stamps.popitem(last=False)

    def take(self, request_id: str) -> RouteStamps | None:
        with self._lock:
            return self._stamps.pop(request_id, None)


_ROUTE_STAMPS = _RouteStampBoard()


def route_stamps() -> _RouteStampBoard:
    """This process's board. Serve pickles the ingress and router classes by value, and with them
    a copy of every module-level object they name; a function is pickled by reference, so this
    one hands both of them the same board."""
    return _ROUTE_STAMPS


@dataclass
class IngressTrace:
    """One request's stamps, as the ingress collects them."""

    received: float = field(default_factory=time.perf_counter)
    received_unix: float = field(default_factory=time.time)
    _perf: dict[str, float] = field(default_factory=dict)  # ingress-process stamps
    _worker: WorkerTiming | None = None
    replica_id: str = ""

    def mark(self, stamp: str) -> None:
        self._perf[stamp] = time.perf_counter()

    def add_route(self, stamps: RouteStamps | None) -> None:
        if stamps is not None:
            self._perf.update(route_start=stamps.started, hashed=stamps.hashed, routed=stamps.routed)

    def add_worker(self, timing: WorkerTiming | None, replica_id: str = "") -> None:
        self._worker, self.replica_id = timing, replica_id

    def stamps_ms(self) -> dict[str, float]:
        """Every stamp present, as ms after `received`, in path order."""
        at = {name: (t - self.received) * 1e3 for name, t in self._perf.items()}
        at["received"] = 0.0
        w = self._worker
        if w is not None:
            base = (w.received_unix - self.received_unix) * 1e3
            at["worker_received"] = base
            for name, offset in (("engine_added", w.engine_added_s), ("engine_first_step", w.engine_first_step_s),
                                 ("first_token", w.first_token_s), ("worker_first_yield", w.first_yield_s)):
                if offset is not None:
                    at[name] = base + offset * 1e3
        return {name: at[name] for name in STAMPS if name in at}

    def intervals_ms(self) -> dict[str, float]:
        """Time spent reaching each stamp from the previous one present, plus `ingress_total`."""
        stamps = self.stamps_ms()
        intervals: dict[str, float] = {}
        previous = None
        for name, at in stamps.items():
            if previous is not None:
                intervals[INTERVALS[name]] = at - stamps[previous]
            previous = name
        if "first_token_sent" in stamps:
            intervals[TOTAL] = stamps["first_token_sent"]
        return intervals


def timing_payload(trace: IngressTrace) -> dict:
    """The reply's `tandem_timing` field."""
    return {"received_unix": trace.received_unix, "replica_id": trace.replica_id,
            "stamps_ms": {k: round(v, 4) for k, v in trace.stamps_ms().items()},
            "intervals_ms": {k: round(v, 4) for k, v in trace.intervals_ms().items()}}


# Seconds; from a cached short prompt on a CPU (~0.1 ms stages) to a long queue.
BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAM_NAME = "tandem_ttft_stage_seconds"


class StageHistograms:
    """A Prometheus histogram per interval name (one ingress replica's requests)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS_S) -> None:
        self._buckets = buckets
        self._counts: dict[str, list[int]] = {}  # per bucket, not cumulative; last slot is +Inf
        self._sums: dict[str, float] = {}

    def observe(self, intervals_ms: dict[str, float]) -> None:
        for stage, ms in intervals_ms.items():
            seconds = max(0.0, ms / 1e3)  # cross-process intervals can read a hair below 0
            counts = self._counts.setdefault(stage, [0] * (len(self._buckets) + 1))
            slot = next((i for i, bound in enumerate(self._buckets) if seconds <= bound), len(self._buckets))
            counts[slot] += 1
            self._sums[stage] = self._sums.get(stage, 0.0) + seconds

    def render(self, labels: str) -> list[str]:
        """Prometheus text lines; `labels` is the other labels' text, e.g. `model_name="m"`."""
        if not self._counts:
            return []
        lines = [f"# HELP {HISTOGRAM_NAME} Time to reach each stage of the serving path from the previous one, "
                 "up to the first token sent (router.stage_timing).",
                 f"# TYPE {HISTOGRAM_NAME} histogram"]
        for stage in sorted(self._counts):
            running = 0
            for bound, count in zip((*self._buckets, float("inf")), self._counts[stage]):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{HISTOGRAM_NAME}_bucket{{{labels},stage="{stage}",le="{le}"}} {running}')
            lines.append(f'{HISTOGRAM_NAME}_sum{{{labels},stage="{stage}"}} {self._sums[stage]}')
            lines.append(f'{HISTOGRAM_NAME}_count{{{labels},stage="{stage}"}} {running}')
        return lines
