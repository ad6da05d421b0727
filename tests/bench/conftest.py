"""Fixtures for the load generator's tests: a fake OpenAI-compatible server per test, and a
helper that runs one stage against it."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest

from tandem.bench.loadgen.arrivals import ClosedLoop
from tandem.bench.loadgen.report import BenchReport, RequestRecord, RunInfo, StageReport
from tandem.bench.loadgen.request import RequestResult
from tandem.bench.loadgen.stats import StageSummary
from tandem.bench.loadgen.client import ClientConfig, OpenAIClient
from tandem.bench.loadgen.runner import StageConfig, StageRun, run_stage
from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import Workload
from tests.bench.fake_openai_server import FakeBehavior, FakeOpenAIServer


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Factory: `fake_server(ttft_s=..., failures=...)` starts a server; all are stopped after."""
    servers: list[FakeOpenAIServer] = []

    def start(**behavior: object) -> FakeOpenAIServer:
        server = FakeOpenAIServer(FakeBehavior(**behavior)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL nothing answers: a port held bound but not listening, so no other process can take
    it while the test runs (connections to it are refused)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{holder.getsockname()[1]}"
    holder.close()


def run_against(url: str, workload: Workload, config: StageConfig | None = None, *, endpoint: str = "chat",
                counter: TokenCounter | None = None, request_timeout_s: float = 10.0) -> StageRun:
    counter = counter or TokenCounter()
    config = config or StageConfig(ClosedLoop(4), num_requests=8)

    async def go() -> StageRun:
        client_config = ClientConfig(url, "fake-model", endpoint, request_timeout_s=request_timeout_s)
        async with OpenAIClient(client_config, counter) as client:
            return await run_stage(client, workload.sessions(), counter, config)

    return asyncio.run(go())


def minimal_report(summaries: list[StageSummary], results: list[RequestResult]) -> BenchReport:
    """A report around given summaries, for checking what the markdown says."""
    run = RunInfo("test", "http://x", "chat", "m", "w", "words", "closed", 0, 1, None, 0, "now", "(test)")
    return BenchReport(run, tuple(StageReport(s, None, tuple(RequestRecord.of(r) for r in results)) for s in summaries))
