"""The streaming client against a fake server with injected delays and failures: measured
TTFT / ITL / TPOT / E2E and their percentiles match what was injected; every failure is counted
by kind, none crashes the run."""
from __future__ import annotations

import numpy as np

from tandem.bench.loadgen.arrivals import ClosedLoop
from tandem.bench.loadgen.report import render_markdown
from tandem.bench.loadgen.runner import StageConfig
from tandem.bench.loadgen.stats import summarize
from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import LengthDist, MultiTurnChat, RandomWorkload
from tests.bench.conftest import minimal_report, run_against


def random_workload(output_tokens: int, input_tokens: int = 20) -> RandomWorkload:
    return RandomWorkload(TokenCounter(), LengthDist(input_tokens), LengthDist(output_tokens), seed=3)


def test_timings_match_injected_delays(fake_server):
    ttft, gap, tokens = 0.100, 0.020, 10
    server = fake_server(ttft_s=ttft, token_delay_s=gap)
    stage = run_against(server.url, random_workload(tokens), StageConfig(ClosedLoop(4), num_requests=16))

    assert len(stage.results) == 16 and all(r.ok for r in stage.results)
    for result in stage.results:
        assert result.output_tokens == tokens  # from usage
        assert result.prompt_tokens == 21  # the server's count: 20 words + its role marker
        assert len(result.itl_s) == tokens - 1
        assert result.ttft_s >= ttft
        assert result.e2e_s >= ttft + (tokens - 1) * gap
    summary = summarize("t", "closed", 4, stage.results)
    lat = summary.latency
    # Lower bounds are hard (the server sleeps at least that long); upper bounds leave room for a
    # loaded 2-core machine.
    assert 100 <= lat.ttft_ms.p50 <= 125
    assert 19 <= lat.itl_ms.p50 <= 28
    assert 19.5 <= lat.tpot_ms.mean <= 28
    assert 280 <= lat.e2e_ms.p50 <= 340
    assert lat.ttft_ms.p99 < 200
    assert summary.usage_missing == 0 and summary.failed == 0
    # Output throughput is tokens over the measured window.
    assert abs(summary.output_token_throughput - 16 * tokens / summary.window_s) < 1e-6


def test_ttft_percentiles_follow_an_injected_spread(fake_server):
    injected = [0.020 + 0.010 * n for n in range(20)]  # 20 ms .. 210 ms, one per request
    server = fake_server(ttft_by_request=injected, token_delay_s=0.001)
    # One request at a time, so request number n (server side) is result n (client side).
    stage = run_against(server.url, random_workload(2), StageConfig(ClosedLoop(1), num_requests=20))
    measured_ms = [r.ttft_s * 1e3 for r in stage.results]
    summary = summarize("t", "closed", 1, stage.results)
    injected_ms = np.asarray(injected) * 1e3
    for quantile, value in (("p50", 50), ("p90", 90), ("p99", 99)):
        expected = float(np.percentile(injected_ms, value))
        assert expected <= getattr(summary.latency.ttft_ms, quantile) <= expected + 15
    assert all(m >= i for m, i in zip(measured_ms, injected_ms))
    assert summary.latency.ttft_ms.mean <= float(injected_ms.mean()) + 15


def test_failures_are_counted_by_kind_not_raised(fake_server):
    failures = {1: "500", 3: "429", 5: "drop", 7: "malformed", 9: "stream_error", 10: "truncated"}
    server = fake_server(ttft_s=0.01, token_delay_s=0.005, failures=failures)
    stage = run_against(server.url, random_workload(4), StageConfig(ClosedLoop(3), num_requests=14))
    summary = summarize("t", "closed", 3, stage.results)
    assert summary.errors == {"connection": 1, "http_429": 1, "http_500": 1, "malformed_stream": 2, "stream_error": 1}
    assert summary.failed == 6 and summary.succeeded == 8
    assert summary.latency.ttft_ms.count == 8  # failed requests stay out of the latency stats
    details = {r.error_kind: r.error_detail for r in stage.results if not r.ok}
    assert "injected failure" in details["http_500"]
    assert "engine died" in details["stream_error"]
    markdown = render_markdown(minimal_report([summary], stage.results))
    assert "`http_500` 1" in markdown and "`connection` 1" in markdown


def test_timeout_and_refused_connection(fake_server, refused_url):
    server = fake_server(ttft_s=0.01, token_delay_s=0.001, failures={0: "hang"})
    stage = run_against(server.url, random_workload(2), StageConfig(ClosedLoop(2), num_requests=4), request_timeout_s=0.5)
    kinds = [r.error_kind for r in stage.results]
    assert kinds.count("timeout") == 1 and kinds.count(None) == 3
    timed_out = next(r for r in stage.results if r.error_kind == "timeout")
    assert 0.5 <= timed_out.e2e_s < 1.5

    refused = run_against(refused_url, random_workload(2), StageConfig(ClosedLoop(2), num_requests=3))
    assert [r.error_kind for r in refused.results] == ["connection"] * 3


def test_missing_usage_is_reported_not_guessed(fake_server):
    server = fake_server(ttft_s=0.01, token_delay_s=0.002, send_usage=False)
    stage = run_against(server.url, random_workload(5), StageConfig(ClosedLoop(2), num_requests=4), endpoint="completions")
    assert all(r.ok and r.output_tokens is None and r.tpot_s is None for r in stage.results)
    assert all(r.output_chunks == 5 and len(r.itl_s) == 4 for r in stage.results)  # timing still measured
    summary = summarize("t", "closed", 2, stage.results)
    assert summary.usage_missing == 4
    assert summary.output_token_throughput == 0.0 and summary.latency.tpot_ms is None
    assert summary.latency.itl_ms.count == 16
    assert "without `usage`" in render_markdown(minimal_report([summary], stage.results))


def test_completions_payload_and_text(fake_server):
    server = fake_server(ttft_s=0.005, token_delay_s=0.001)
    stage = run_against(server.url, random_workload(3), StageConfig(ClosedLoop(1), num_requests=2), endpoint="completions")
    payload = server.received[0].payload
    assert server.received[0].path == "/v1/completions"
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert isinstance(payload["prompt"], str) and payload["max_tokens"] == 3
    assert stage.results[0].text == server.received[0].answer == " w0_0 w0_1 w0_2"


def test_multi_turn_sends_real_answers_and_session_ids(fake_server):
    server = fake_server(ttft_s=0.005, token_delay_s=0.001)
    workload = MultiTurnChat(TokenCounter(), LengthDist(8), LengthDist(3), min_turns=3, max_turns=3,
                             think_time_s=0.01, system_prompt_tokens=5, seed=1)
    stage = run_against(server.url, workload, StageConfig(ClosedLoop(2), num_requests=12))
    assert all(r.ok for r in stage.results)
    by_conversation: dict[str, list] = {}
    for received in server.received:
        assert received.payload["user"] == received.session_header  # both carry the conversation id
        by_conversation.setdefault(received.session_header, []).append(received)
    # The budget (12 requests) may cut the last conversations short; most run all three turns.
    assert sum(len(turns) == 3 for turns in by_conversation.values()) >= 3
    for turns in by_conversation.values():
        # system + user, then + assistant + user per turn
        assert [len(t.payload["messages"]) for t in turns] == [2, 4, 6][: len(turns)]
        for earlier, later in zip(turns, turns[1:]):
            # turn k = turn k-1's messages + the server's real answer + the next user message
            assert later.payload["messages"][: len(earlier.payload["messages"])] == earlier.payload["messages"]
            assert later.payload["messages"][len(earlier.payload["messages"])] == {"role": "assistant", "content": earlier.answer}


def test_multi_turn_on_completions_keeps_prompt_prefixes(fake_server):
    server = fake_server(ttft_s=0.005, token_delay_s=0.001)
    workload = MultiTurnChat(TokenCounter(), LengthDist(6), LengthDist(2), min_turns=2, max_turns=4, think_time_s=0, seed=5)
    stage = run_against(server.url, workload, StageConfig(ClosedLoop(1), num_requests=10), endpoint="completions")
    assert all(r.ok for r in stage.results)
    previous = None
    for received in server.received:
        turn_index = next(r.turn_index for r in stage.results if r.request_index == received.number)
        if turn_index > 0:
            assert received.payload["prompt"].startswith(previous.payload["prompt"] + previous.answer)
        previous = received


def test_a_server_that_does_not_stream_is_a_malformed_stream(fake_server):
    from aiohttp import web

    from tests.bench.fake_openai_server import FakeOpenAIServer

    class JsonOnlyServer(FakeOpenAIServer):
        async def _completion(self, request: web.Request) -> web.StreamResponse:
            return web.json_response({"choices": [{"text": "not streamed", "finish_reason": "stop"}]})

    server = JsonOnlyServer().start()
    try:
        stage = run_against(server.url, random_workload(2), StageConfig(ClosedLoop(1), num_requests=2))
    finally:
        server.stop()
    assert [r.error_kind for r in stage.results] == ["malformed_stream"] * 2
    assert "did not stream" in stage.results[0].error_detail


def test_ttft_counts_a_first_token_with_empty_text(fake_server):
    """The first two tokens of each answer stream with empty text (special tokens, or half of a
    multi-byte character): TTFT is still the first token's chunk, as vLLM's benchmark takes it,
    and every token chunk gets its ITL gap. Chat's role chunk, sent before the wait, is not a
    token."""
    ttft, gap, tokens = 0.050, 0.300, 5  # a gap wide enough for a busy machine
    for endpoint in ("chat", "completions"):
        server = fake_server(ttft_s=ttft, token_delay_s=gap, empty_tokens=2)
        stage = run_against(server.url, random_workload(tokens), StageConfig(ClosedLoop(2), num_requests=4),
                            endpoint=endpoint)
        for result in stage.results:
            assert result.ok and result.output_tokens == tokens
            assert ttft <= result.ttft_s < ttft + gap, (endpoint, result.ttft_s)  # not the third token's
            assert len(result.itl_s) == tokens - 1
            assert result.text.startswith(" w")  # the empty pieces add no text
