"""The serving path's stage timing without Serve: the ingress trace puts the router's and the
worker's stamps on one axis in path order, the route board hands stamps across threads and
stays bounded, the histograms render valid cumulative Prometheus buckets, and the engine
thread's own stamps (AsyncLLM) are filled in, in order, before the first output arrives."""
from __future__ import annotations

import asyncio
import time

import pytest

from tandem.bench.loadgen.server_metrics import parse_prometheus_text
from tandem.router.openai_metrics import render_prometheus
from tandem.router.stage_timing import (
    INTERVALS,
    STAMPS,
    TOTAL,
    IngressTrace,
    RouteStamps,
    StageHistograms,
    _RouteStampBoard,
    route_stamps,
    timing_payload,
)
from tandem.protocol.worker import WorkerTiming


def _traced_request() -> IngressTrace:
    trace = IngressTrace()
    for stamp in ("body_read", "parsed", "tokenized", "dispatched"):
        time.sleep(0.001)
        trace.mark(stamp)
    started = time.perf_counter()
    trace.add_route(RouteStamps(started, started + 0.0005, started + 0.002))
    time.sleep(0.003)
    # The worker: another process in real life; its wall clock is all the two share.
    worker_received_unix = time.time()
    trace.add_worker(WorkerTiming(worker_received_unix, 0.001, 0.0012, 0.006, 0.0065), "replica-1")
    time.sleep(0.008)
    trace.mark("first_delta")
    trace.mark("first_token_sent")
    return trace


def test_trace_stamps_are_in_path_order_on_one_axis():
    trace = _traced_request()
    stamps = trace.stamps_ms()
    assert list(stamps) == list(STAMPS)  # all present, path order
    values = list(stamps.values())
    assert values[0] == 0.0
    # Cross-process placement: wall clock vs the ingress's monotonic clock agree to well
    # under a millisecond on one host.
    assert all(b >= a - 0.5 for a, b in zip(values, values[1:])), stamps
    assert stamps["engine_first_step"] - stamps["engine_added"] == pytest.approx(0.2, abs=1e-6)
    assert stamps["first_token"] - stamps["worker_received"] == pytest.approx(6.0, abs=1e-6)

    intervals = trace.intervals_ms()
    assert list(intervals) == [INTERVALS[s] for s in STAMPS[1:]] + [TOTAL]
    assert sum(v for k, v in intervals.items() if k != TOTAL) == pytest.approx(intervals[TOTAL], abs=1e-6)
    assert intervals[TOTAL] == stamps["first_token_sent"]


def test_missing_stamps_fold_into_the_next_interval():
    trace = IngressTrace()
    trace.mark("parsed")
    trace.mark("tokenized")
    trace.mark("dispatched")
    trace.add_route(None)  # routed by Serve's fallback: no router stamps
    trace.add_worker(None)  # the worker sent none (e.g. it refused the request)
    trace.mark("first_delta")
    trace.mark("first_token_sent")
    stamps, intervals = trace.stamps_ms(), trace.intervals_ms()
    assert list(stamps) == ["received", "parsed", "tokenized", "dispatched", "first_delta", "first_token_sent"]
    # dispatched -> first_delta is reported as the interval ending at first_delta
    assert intervals["to_ingress"] == pytest.approx(stamps["first_delta"] - stamps["dispatched"])
    assert "route" not in intervals and "engine_first_token" not in intervals


def test_timing_payload_is_plain_json():
    import json

    payload = timing_payload(_traced_request())
    assert set(payload) == {"received_unix", "replica_id", "stamps_ms", "intervals_ms"}
    assert payload["replica_id"] == "replica-1"
    assert json.loads(json.dumps(payload)) == payload


def test_route_board_keeps_the_first_start_and_stays_bounded():
    board = _RouteStampBoard(capacity=3)
    board.put("a", RouteStamps(1.0, 2.0, 3.0))
    board.put("a", RouteStamps(5.0, 6.0, 7.0))  # Serve asked again: replicas were full
    assert board.take("a") == RouteStamps(1.0, 6.0, 7.0)
    assert board.take("a") is None
    for i in range(5):
        board.put(str(i), RouteStamps(i, i, i))
    assert [board.take(str(i)) is not None for i in range(5)] == [False, False, True, True, True]
    assert route_stamps() is route_stamps()


def test_histograms_render_cumulative_buckets():
    histograms = StageHistograms(buckets=(0.001, 0.01))
    histograms.observe({"route": 0.5, "hash": 2.0, TOTAL: 30.0})
    histograms.observe({"route": 5.0, "hash": -0.01, TOTAL: 12.0})  # a hair below 0 counts as 0
    text = render_prometheus({}, "m", {"tandem_ingress_requests_total": 2}, histograms)
    samples = {(s.name, s.labels): s.value for s in parse_prometheus_text(text)}
    name = "tandem_ttft_stage_seconds"
    assert samples[(f"{name}_bucket", '{model_name="m",stage="route",le="0.001"}')] == 1
    assert samples[(f"{name}_bucket", '{model_name="m",stage="route",le="0.01"}')] == 2
    assert samples[(f"{name}_bucket", '{model_name="m",stage="route",le="+Inf"}')] == 2
    assert samples[(f"{name}_bucket", f'{{model_name="m",stage="{TOTAL}",le="0.01"}}')] == 0
    assert samples[(f"{name}_count", f'{{model_name="m",stage="{TOTAL}"}}')] == 2
    assert samples[(f"{name}_sum", '{model_name="m",stage="route"}')] == pytest.approx(0.0055)
    assert f"# TYPE {name} histogram" in text
    assert render_prometheus({}, "m", {}, StageHistograms()).count(name) == 0  # nothing observed yet


def test_async_engine_stamps_a_request_in_order(tiny_model):
    from tandem import SamplingParams
    from tandem.engine.async_engine import AsyncLLM, EngineTiming
    from tandem.engine.config import EngineConfig

    llm = AsyncLLM.from_config(EngineConfig(model=tiny_model, num_kv_blocks=64, max_model_len=256))

    async def first_output(timing: EngineTiming | None):
        submitted = time.perf_counter()
        async for out in llm.generate({"prompt_token_ids": [5, 6, 7, 8, 9]},
                                      SamplingParams(max_tokens=3, temperature=0), timing=timing):
            return submitted, time.perf_counter(), out

    try:
        timing = EngineTiming()
        submitted, received, out = asyncio.run(first_output(timing))
        assert submitted <= timing.added <= timing.first_step <= timing.first_output <= received
        _, _, plain = asyncio.run(first_output(None))  # no timing asked: same output
        assert plain.outputs[0].token_ids == out.outputs[0].token_ids
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tandem.engine.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("timing") / "llama", "llama", seed=0))
