"""One stage of a benchmark: sessions from a workload, started by an arrival process, until a
request budget (count and/or duration) runs out; then in-flight requests finish and it stops.

Warm-up requests are the first `warmup_requests` sent; they run like any other but are marked
so statistics leave them out. A conversation whose request fails is abandoned (its later turns
would need the answer it did not get). When the served model's context length is known, a
request whose prompt and max_tokens would not fit is not sent (`ContextGuard`): a
conversation ends at that turn, as a chat client starts a new chat when the old one is full."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tandem.bench.loadgen.arrivals import ArrivalProcess
from tandem.bench.loadgen.client import OpenAIClient
from tandem.bench.loadgen.progress import Progress
from tandem.bench.loadgen.request import BenchRequest, RequestResult
from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import Session


@dataclass(frozen=True)
class StageConfig:
    arrival: ArrivalProcess
    num_requests: int | None = None  # measured requests, after warm-up
    duration_s: float | None = None  # wall-clock bound on the whole stage, warm-up included
    warmup_requests: int = 0
    max_concurrency: int | None = None  # open loop: cap on sessions in flight
    seed: int = 0
    max_model_len: int | None = None  # the served model's context length, when known

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a stage needs a request count or a duration (or both)")


@dataclass
class StageRun:
    arrival: ArrivalProcess
    results: list[RequestResult]
    wall_s: float  # the whole stage, warm-up and drain included
    sessions_started: int = 0
    over_context: int = 0  # requests not sent: they would not fit the model's context


# Tokens a server adds around our count of a prompt: BOS, the chat template's markers that our
# rendering misses.
CONTEXT_MARGIN_TOKENS = 16
# This many requests in a row that do not fit, none sent between: the workload does not fit the
# model at all, and the stage stops with an error instead of drawing sessions forever.
MAX_CONSECUTIVE_OVER_CONTEXT = 200


@dataclass
class ContextGuard:
    """Keeps requests within the served model's context: prompt tokens (ours, scaled by what
    the server has reported so far when our count is an estimate) + max_tokens + a margin."""

    max_model_len: int | None
    exact_counts: bool  # our token counts come from the model's tokenizer
    tokens_per_token: float = 1.0  # the server's prompt tokens per one of our estimate, the most seen

    def fits(self, request: BenchRequest) -> bool:
        if self.max_model_len is None:
            return True
        prompt = math.ceil(request.input_tokens * self.tokens_per_token)
        return prompt + request.max_tokens + CONTEXT_MARGIN_TOKENS <= self.max_model_len

    def learn(self, result: RequestResult) -> None:
        """An estimate (one word for one token) learns how many tokens a word really is."""
        if not self.exact_counts and result.prompt_tokens and result.input_tokens_estimate >= 32:
            self.tokens_per_token = max(self.tokens_per_token, result.prompt_tokens / result.input_tokens_estimate)

    @property
    def measured(self) -> list[RequestResult]:
        return [r for r in self.results if not r.warmup]


@dataclass
class RequestBudget:
    """Hands out request indices until the count or the time runs out."""

    total: int | None
    duration_s: float | None
    started_at: float = field(default_factory=time.perf_counter)
    issued: int = 0

    def time_left(self) -> float:
        if self.duration_s is None:
            return float("inf")
        return self.duration_s - (time.perf_counter() - self.started_at)

    @property
    def exhausted(self) -> bool:
        return (self.total is not None and self.issued >= self.total) or self.time_left() <= 0

    def take(self) -> int | None:
        if self.exhausted:
            return None
        self.issued += 1
        return self.issued - 1

    async def sleep(self, seconds: float) -> None:
        """Sleep, but not past the end of the stage."""
        await asyncio.sleep(max(0.0, min(seconds, self.time_left())))


async def run_stage(
    client: OpenAIClient,
    sessions: Iterator[Session],
    counter: TokenCounter,
    config: StageConfig,
    progress: Progress | None = None,
) -> StageRun:
    total = None if config.num_requests is None else config.num_requests + config.warmup_requests
    budget = RequestBudget(total, config.duration_s)
    origin = budget.started_at
    results: list[RequestResult] = []
    sessions_started = over_context = over_in_a_row = 0
    guard = ContextGuard(config.max_model_len, counter.exact)
    failure: list[BaseException] = []  # set once: the stage stops drawing sessions

    async def play(session: Session) -> None:
        nonlocal over_context, over_in_a_row
        answers: list[str] = []
        for turn_index, turn in enumerate(session.turns):
            if turn_index > 0 and turn.think_time_s > 0:
                await budget.sleep(turn.think_time_s)
            request = session.request(turn_index, answers, counter)
            if not guard.fits(request):  # the conversation is full: its later turns are longer still
                over_context += 1
                over_in_a_row += 1
                if over_in_a_row >= MAX_CONSECUTIVE_OVER_CONTEXT and not failure:
                    failure.append(ValueError(
                        f"{over_in_a_row} requests in a row would not fit the served model's context of "
                        f"{config.max_model_len} tokens (prompt + max_tokens); shorten the workload's lengths"))
                await asyncio.sleep(0)
                return
            over_in_a_row = 0
            request_index = budget.take()
            if request_index is None:
                return
            if progress is not None:
                progress.sent += 1
            result = await client.send(request, request_index, request_index < config.warmup_requests, origin)
            results.append(result)
            guard.learn(result)
            if progress is not None:
                progress.done += 1
                progress.failed += not result.ok
                progress.output_tokens += result.output_tokens or 0
            if not result.ok:
                return
            answers.append(result.text)

    def next_session() -> Session | None:
        nonlocal sessions_started
        if budget.exhausted or failure:
            return None
        session = next(sessions, None)
        sessions_started += session is not None
        return session

    if config.arrival.closed_loop:
        async def user() -> None:
            while (session := next_session()) is not None:
                await play(session)

        concurrency = int(config.arrival.offered_load)
        await asyncio.gather(*(user() for _ in range(concurrency)))
    else:
        limiter = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        in_flight: set[asyncio.Task[None]] = set()

        async def play_limited(session: Session) -> None:
            try:
                await play(session)
            finally:
                if limiter is not None:
                    limiter.release()

        gaps = config.arrival.gaps(np.random.default_rng([config.seed, 7]))
        next_start = time.perf_counter()
        while not budget.exhausted and not failure:
            next_start += next(gaps)
            delay = next_start - time.perf_counter()
            if delay > 0:
                await budget.sleep(delay)
            if limiter is not None:
                await limiter.acquire()
            session = next_session()
            if session is None:
                if limiter is not None:
                    limiter.release()
                break
            task = asyncio.create_task(play_limited(session))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            await asyncio.sleep(0)  # let the session take its budget before the next check
        if in_flight:
            await asyncio.gather(*in_flight)

    if failure:
        raise failure[0]
    results.sort(key=lambda r: r.request_index)
    return StageRun(config.arrival, results, time.perf_counter() - origin, sessions_started, over_context)
