"""Statistics and the Prometheus scrape: percentiles, TPOT, throughput and goodput computed
from known per-request values; counters parsed under either prefix, summed, and diffed."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tandem.bench.loadgen.request import RequestResult
from tandem.bench.loadgen.server_metrics import (
    ServerCounters, counters_delta, counters_from_samples, parse_prometheus_text, scrape,
)
from tandem.bench.loadgen.stats import Slo, distribution, summarize


def result(index, ttft, e2e, tokens, itl=(), start=0.0, error=None, kind="random", warmup=False):
    return RequestResult(index, kind, None, 0, warmup, start, 10, tokens or 0, ttft_s=ttft, e2e_s=e2e,
                         itl_s=list(itl), prompt_tokens=12 if tokens else None, output_tokens=tokens,
                         error_kind=error)


def test_distribution_matches_numpy():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    dist = distribution(values)
    assert dist.count == 8 and dist.mean == pytest.approx(np.mean(values))
    assert (dist.p50, dist.p90, dist.p99) == tuple(pytest.approx(v) for v in np.percentile(values, [50, 90, 99]))
    assert dist.min == 1.0 and dist.max == 9.0
    assert distribution([]) is None


def test_summary_tpot_throughput_goodput_and_errors():
    results = [
        result(0, 0.1, 1.1, 11, itl=[0.1] * 10, start=0.0),     # TPOT 100 ms
        result(1, 0.2, 0.7, 6, itl=[0.1] * 5, start=0.5),       # TPOT 100 ms
        result(2, 0.9, 1.4, 6, itl=[0.05, 0.45], start=1.0),    # TTFT too slow for the SLO
        result(3, None, 0.2, None, start=1.5, error="http_500"),
        result(4, 0.1, 0.5, None, itl=[0.4], start=0.1),        # no usage: counted, not guessed
        result(5, 0.1, 0.3, 3, start=0.0, warmup=True),         # warm-up: ignored
    ]
    summary = summarize("s", "x", 1.0, results, [Slo.parse("ttft_ms=500"), Slo.parse("tpot_ms=120")])
    assert summary.measured_requests == 5 and summary.succeeded == 4 and summary.failed == 1
    assert summary.errors == {"http_500": 1}
    assert summary.usage_missing == 1
    assert summary.window_s == pytest.approx(2.4)  # first start 0.0, last end 1.0 + 1.4
    assert summary.output_token_throughput == pytest.approx((11 + 6 + 6) / 2.4)
    assert summary.request_throughput == pytest.approx(4 / 2.4)
    assert summary.input_token_throughput == pytest.approx((12 * 3 + 10) / 2.4)  # usage, else our estimate
    assert summary.input_tokens_from_usage == 3
    assert summary.latency.tpot_ms.count == 3
    assert summary.latency.tpot_ms.p50 == pytest.approx(100.0)
    assert summary.latency.itl_ms.count == 10 + 5 + 2 + 1
    assert summary.latency.ttft_ms.count == 4
    # Requests 0 and 1 meet both SLOs; 2 is too slow, 3 failed, 4 has no usage so TPOT is unknown.
    assert summary.slo_attainment == pytest.approx(2 / 5)
    assert summary.goodput_rps == pytest.approx(2 / 2.4)


def test_results_of_several_kinds_are_also_summarised_per_kind():
    results = [result(0, 0.1, 0.2, 2, kind="short"), result(1, 2.0, 2.5, 2, kind="long")]
    summary = summarize("s", "x", 1.0, results)
    assert set(summary.by_kind) == {"short", "long"}
    assert summary.by_kind["long"].ttft_ms.p50 == pytest.approx(2000.0)


def test_slo_parsing():
    assert Slo.parse("ttft_ms=500") == Slo("ttft_ms", 500.0)
    assert Slo.parse("itl_ms=80").met(result(0, 0.1, 0.3, 3, itl=[0.05, 0.07]))
    assert not Slo.parse("itl_ms=60").met(result(0, 0.1, 0.3, 3, itl=[0.05, 0.07]))
    for bad in ("ttft=500", "ttft_ms", "speed_ms=3"):
        with pytest.raises(ValueError):
            Slo.parse(bad)


METRICS_TEXT = """
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0
vllm:prefix_cache_hits_total{engine="0",model_name="m, with {braces}"} 600.0
vllm:prefix_cache_hits_created{engine="0"} 1.7e9
vllm:num_requests_running{engine="0"} 3
ray_tandem_kv_transfer_bytes_total{pair="p0-d0"} 2.5e6 1700000000000
garbage line without value
"""


def test_prometheus_counters_parse_under_either_prefix():
    counters = counters_from_samples(parse_prometheus_text(METRICS_TEXT))
    assert (counters.prefix_cache_hits, counters.prefix_cache_queries, counters.kv_transfer_bytes) == (600.0, 1500.0, 2.5e6)
    tandem = counters_from_samples(parse_prometheus_text("tandem_prefix_cache_hits_total 5\ntandem_prefix_cache_queries_total 8\n"))
    assert (tandem.prefix_cache_hits, tandem.prefix_cache_queries, tandem.kv_transfer_bytes) == (5.0, 8.0, None)
    assert counters_from_samples(parse_prometheus_text("other_metric 1\n")) == ServerCounters()


def test_one_quantity_exported_under_several_names_is_counted_once():
    """Tandem's /metrics carries every counter as tandem_* and as vllm:* (same values); a sum
    over both reported twice the server's numbers."""
    text = """
tandem_prefix_cache_queries_total{replica="a"} 700
tandem_prefix_cache_queries_total{replica="b"} 300
vllm:prefix_cache_queries_total{replica="a"} 700
vllm:prefix_cache_queries_total{replica="b"} 300
vllm:gpu_prefix_cache_queries_total{replica="a"} 700
ray_tandem_prefix_cache_queries_total{replica="a"} 700
tandem_prefix_cache_hits_total{replica="a"} 400
vllm:prefix_cache_hits_total{replica="a"} 400
"""
    counters = counters_from_samples(parse_prometheus_text(text))
    assert (counters.prefix_cache_queries, counters.prefix_cache_hits) == (1000.0, 400.0)
    assert counters.names == ("tandem_prefix_cache_queries_total", "tandem_prefix_cache_hits_total")
    vllm = counters_from_samples(parse_prometheus_text(
        "vllm:prefix_cache_queries_total 10\nvllm:gpu_prefix_cache_queries_total 10\n"))
    assert vllm.prefix_cache_queries == 10.0 and vllm.names == ("vllm:prefix_cache_queries_total",)
    reexported = counters_from_samples(parse_prometheus_text("ray_tandem_prefix_cache_hits_total 3\n"))
    assert reexported.prefix_cache_hits == 3.0  # a name of ours behind Ray's prefix still counts


def test_counter_deltas_hit_rate_and_absence():
    before = ServerCounters(100.0, 400.0, None)
    after = ServerCounters(400.0, 800.0, None)
    delta = counters_delta(before, after)
    assert (delta.prefix_cache_hits, delta.prefix_cache_queries) == (300.0, 400.0)
    assert delta.prefix_cache_hit_rate == pytest.approx(0.75) and delta.kv_transfer_bytes is None
    assert "prefix cache" in delta.note
    assert counters_delta(ServerCounters(), ServerCounters()).note.startswith("server exposes no")
    reset = counters_delta(ServerCounters(500.0, 900.0), ServerCounters(10.0, 20.0))
    assert reset.prefix_cache_hits is None and "went down" in reset.note
    failed = counters_delta(ServerCounters(error="ClientConnectorError: refused"), after)
    assert failed.prefix_cache_hit_rate is None and "not scraped" in failed.note


def test_scrape_a_live_endpoint_and_tolerate_a_missing_one(fake_server):
    server = fake_server(metric_prefix="vllm:")
    live = asyncio.run(scrape([server.url + "/metrics", server.url + "/metrics"]))
    # summed over both URLs; nothing served yet
    assert (live.prefix_cache_hits, live.prefix_cache_queries, live.kv_transfer_bytes, live.error) == (0.0, 0.0, 0.0, None)
    missing = asyncio.run(scrape([server.url + "/nothing-here"]))
    assert missing.error and "404" in missing.error
    server.stop()
    gone = asyncio.run(scrape([server.url + "/metrics"], timeout_s=2))
    assert gone.error
