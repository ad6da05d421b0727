"""Arrival processes and the stage runner: gaps have the claimed mean and burstiness, seeds
repeat, a stage stops by itself on its count or duration, warm-up is excluded, and an
open-loop concurrency cap holds."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from tandem.bench.loadgen.arrivals import ClosedLoop, FixedRate, Gamma, Poisson, make_arrival
from tandem.bench.loadgen.runner import StageConfig
from tandem.bench.loadgen.stats import summarize
from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import LengthDist, RandomWorkload
from tests.bench.conftest import run_against


def gaps(process, n=20000, seed=0):
    return np.array(list(itertools.islice(process.gaps(np.random.default_rng(seed)), n)))


def test_arrival_gaps_have_the_claimed_shape():
    fixed = gaps(FixedRate(4.0), 100)
    assert np.all(fixed == 0.25)
    poisson = gaps(Poisson(10.0))
    assert abs(poisson.mean() - 0.1) < 0.003 and abs(poisson.std() / poisson.mean() - 1) < 0.05
    bursty = gaps(Gamma(10.0, burstiness=0.25))
    assert abs(bursty.mean() - 0.1) < 0.006 and abs(bursty.std() / bursty.mean() - 2.0) < 0.15  # CV = 1/sqrt(k)
    smooth = gaps(Gamma(10.0, burstiness=4.0))
    assert abs(smooth.std() / smooth.mean() - 0.5) < 0.05
    assert np.array_equal(gaps(Poisson(3.0), 50, seed=1), gaps(Poisson(3.0), 50, seed=1))
    assert not np.array_equal(gaps(Poisson(3.0), 50, seed=1), gaps(Poisson(3.0), 50, seed=2))
    assert np.all(gaps(Poisson(float("inf")), 10) == 0)
    assert make_arrival("closed", 0, concurrency=3) == ClosedLoop(3)
    with pytest.raises(ValueError):
        make_arrival("uniform", 1.0)
    with pytest.raises(ValueError):
        Gamma(1.0, burstiness=0)


def workload():
    return RandomWorkload(TokenCounter(), LengthDist(10), LengthDist(2), seed=0)


def test_open_loop_duration_bound_stops_by_itself(fake_server):
    server = fake_server(ttft_s=0.001, token_delay_s=0.001)
    started = time.perf_counter()
    stage = run_against(server.url, workload(), StageConfig(FixedRate(20.0), duration_s=1.0))
    assert time.perf_counter() - started < 2.0
    assert 17 <= len(stage.results) <= 22  # 20/s for 1 s
    starts = [r.start_s for r in stage.results]
    assert max(starts) < 1.0
    assert abs(np.median(np.diff(starts)) - 0.05) < 0.01  # the fixed schedule is kept


def test_warmup_requests_are_sent_but_excluded(fake_server):
    server = fake_server(ttft_s=0.001, token_delay_s=0.001)
    stage = run_against(server.url, workload(), StageConfig(ClosedLoop(2), num_requests=6, warmup_requests=3))
    assert len(server.received) == 9 and len(stage.results) == 9
    assert [r.warmup for r in stage.results] == [True] * 3 + [False] * 6
    summary = summarize("t", "closed", 2, stage.results)
    assert summary.requests_sent == 9 and summary.warmup_requests == 3 and summary.measured_requests == 6
    assert summary.latency.ttft_ms.count == 6


def test_open_loop_concurrency_cap_and_closed_loop_concurrency(fake_server):
    server = fake_server(ttft_s=0.05, token_delay_s=0.001)
    run_against(server.url, workload(), StageConfig(Poisson(float("inf")), num_requests=8, max_concurrency=2))
    assert server.max_in_flight == 2 and len(server.received) == 8

    server = fake_server(ttft_s=0.05, token_delay_s=0.001)
    run_against(server.url, workload(), StageConfig(ClosedLoop(3), num_requests=9))
    assert server.max_in_flight == 3 and len(server.received) == 9


def test_a_stage_needs_a_bound():
    with pytest.raises(ValueError):
        StageConfig(ClosedLoop(1))


def test_a_conversation_ends_where_its_next_turn_would_not_fit_the_context(fake_server):
    """With the model's context known, no request is sent that cannot fit: prompt (our count)
    + max_tokens + the template margin. A conversation stops at that turn, not with an error."""
    from tandem.bench.loadgen.runner import CONTEXT_MARGIN_TOKENS
    from tandem.bench.loadgen.workloads import MultiTurnChat

    server = fake_server(ttft_s=0.001, token_delay_s=0.001)
    chat = MultiTurnChat(TokenCounter(), LengthDist(20), LengthDist(8), min_turns=6, max_turns=6, think_time_s=0.0)
    context = 120
    stage = run_against(server.url, chat, StageConfig(ClosedLoop(2), num_requests=12, max_model_len=context))
    assert len(stage.results) == 12 and all(r.ok for r in stage.results)
    assert stage.over_context > 0 and max(r.turn_index for r in stage.results) < 5  # cut before turn 6
    assert all(r.input_tokens_estimate + r.max_tokens + CONTEXT_MARGIN_TOKENS <= context for r in stage.results)


def test_a_workload_that_never_fits_stops_with_an_error(fake_server):
    server = fake_server(ttft_s=0.001, token_delay_s=0.001)
    too_long = RandomWorkload(TokenCounter(), LengthDist(500), LengthDist(8), seed=0)
    with pytest.raises(ValueError, match="would not fit the served model's context of 100 tokens"):
        run_against(server.url, too_long, StageConfig(ClosedLoop(2), num_requests=5, max_model_len=100))


def test_an_estimate_learns_the_servers_tokens_per_word():
    from tandem.bench.loadgen.request import BenchRequest, RequestResult
    from tandem.bench.loadgen.runner import ContextGuard

    guard = ContextGuard(max_model_len=1000, exact_counts=False)
    request = BenchRequest(max_tokens=100, prompt="w " * 400, input_tokens=400)
    assert guard.fits(request)
    guard.learn(RequestResult(0, "chat", None, 0, False, 0.0, input_tokens_estimate=100, max_tokens=10,
                              prompt_tokens=250))  # the server counted 2.5 tokens per word
    assert guard.tokens_per_token == 2.5 and not guard.fits(request)
    exact = ContextGuard(max_model_len=1000, exact_counts=True)
    exact.learn(RequestResult(0, "chat", None, 0, False, 0.0, input_tokens_estimate=100, max_tokens=10,
                              prompt_tokens=250))
    assert exact.tokens_per_token == 1.0  # a tokenizer's count is not second-guessed
