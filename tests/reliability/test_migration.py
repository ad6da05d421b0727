"""No stream lost: decode (engine) replicas SIGKILLed mid-stream, again and again, under a real
local Serve app (two `LLMWorker` replicas behind the OpenAI ingress) and the `openai` client
streaming chat and completions, greedy and seeded (and some requests not streamed). Every
request completes, with the text, the finish and the usage of an undisturbed run of the same
requests: the ingress continued each stream on the live replica from the tokens it had already
sent (`router.continuation`). At the end every surviving replica runs nothing and has every KV
block free.

A replica whose engine loop dies while its process lives (a step raises, as a device fault
would make it) ends its own process, and its streams continue the same way.

The engine side of a continuation (seeded draws, penalties, stop strings across the seam) is
`tests/engine/test_continuation.py`; the ingress's wrapper without Ray is
`tests/router/test_continuation.py`."""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import psutil
import pytest
import ray
from ray import serve

from tests.reliability.conftest import app_at
from tests.reliability.probes import metric_values, replica_names, replica_pid, worker_stats

APP = "migration"
ENGINE = {"max_model_len": 512, "num_kv_blocks": 384, "max_num_seqs": 32}
NUM_REQUESTS = 64  # distinct requests; the disturbed run repeats them until the kills are done
CONCURRENCY = 32  # streams in flight: about half of them on the replica a kill takes down
NUM_KILLS = 4  # each waits for Serve's replacement replica (~10-20 s here): the test's wall time
WORDS = "the router keeps each conversation on the replica that holds its cached prefix".split()
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base_url(ray_serve):
    with app_at(ray_serve, APP, num_replicas=2, routing_policy="round_robin", engine_kwargs=ENGINE,
                max_migrations=4, health_check_period_s=1.0) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@dataclass(frozen=True)
class Spec:
    """One request of the mix: chat or completion, greedy or seeded, how long."""

    index: int
    chat: bool
    prompt: str
    max_tokens: int
    sampling: dict
    stream: bool = True

    def create(self, client: openai.OpenAI):
        common = dict(model="tiny", max_tokens=self.max_tokens, **self.sampling)
        if self.stream:
            common.update(stream=True, stream_options={"include_usage": True})
        if self.chat:
            return client.chat.completions.with_raw_response.create(
                messages=[{"role": "user", "content": self.prompt}], **common)
        return client.completions.with_raw_response.create(prompt=self.prompt, **common)


def specs() -> list[Spec]:
    rng = random.Random(25)
    out = []
    for i in range(NUM_REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 30)))
        kind = i % 4
        if kind == 0:
            sampling = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
        elif kind == 1:
            sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i, "extra_body": {"ignore_eos": True}}
        elif kind == 2:
            sampling = {"temperature": 1.0, "seed": 2000 + i, "presence_penalty": 0.5, "frequency_penalty": 0.3,
                        "extra_body": {"ignore_eos": True, "repetition_penalty": 1.2}}
        else:  # may stop early, at a stop string or EOS
            sampling = {"temperature": 0.0, "stop": [rng.choice(["ing", " the", "er"])]}
        out.append(Spec(i, chat=i % 2 == 1, prompt=prompt, max_tokens=rng.randrange(40, 120), sampling=sampling,
                        stream=i % 8 < 7))  # and some non-streamed: nothing sent until the end
    return out


@dataclass
class Result:
    replica: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    chunks: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    error: str | None = None
    kills: list[str] = field(default_factory=list)


def run_one(client: openai.OpenAI, spec: Spec) -> Result:
    result = Result()
    try:
        result.started_at = time.monotonic()
        raw = spec.create(client)
        result.replica = raw.headers.get("x-tandem-replica", "")
        if not spec.stream:
            reply = raw.parse()
            choice = reply.choices[0]
            result.text = choice.message.content if spec.chat else choice.text
            result.finish_reason = choice.finish_reason
            result.usage = {"prompt": reply.usage.prompt_tokens, "completion": reply.usage.completion_tokens,
                            "total": reply.usage.total_tokens}
            result.ended_at = time.monotonic()
            return result
        for chunk in raw.parse():
            if chunk.usage is not None:
                result.usage = {"prompt": chunk.usage.prompt_tokens, "completion": chunk.usage.completion_tokens,
                                "total": chunk.usage.total_tokens}
            for choice in chunk.choices:
                result.text += (choice.delta.content or "") if spec.chat else choice.text
                result.finish_reason = choice.finish_reason or result.finish_reason
                result.chunks += 1
    except Exception as error:  # noqa: BLE001 - reported by the test
        result.error = f"{type(error).__name__}: {error}"
    result.ended_at = time.monotonic()
    return result


def run_all(client: openai.OpenAI, mix: list[Spec], during: Callable[[], None] | None = None) -> list[Result]:
    """The mix, CONCURRENCY at a time; `during()` runs in this thread meanwhile."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(run_one, client, spec) for spec in mix]
        if during is not None:
            during()
        return [f.result(timeout=240) for f in futures]


def run_until(client: openai.OpenAI, mix: list[Spec], done: threading.Event) -> list[tuple[Spec, Result]]:
    """The mix over and over, CONCURRENCY at a time, until `done` is set and each request of
    the mix ran at least once."""
    counter = itertools.count()
    lock = threading.Lock()
    results: list[tuple[Spec, Result]] = []

    def client_loop() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= len(mix) and done.is_set():
                return
            spec = mix[i % len(mix)]
            result = run_one(client, spec)
            with lock:
                results.append((spec, result))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive(), "a client hung"
    return results


def running_replicas() -> int:
    status = serve.status().applications[APP].deployments["LLMWorker"]
    return status.replica_states.get("RUNNING", 0)


class Killer(threading.Thread):
    """SIGKILLs a random engine replica at random moments, whenever both are up."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.rng = rng
        self.stop = threading.Event()
        self.done = threading.Event()  # NUM_KILLS done, and the streams of the last one finished
        self.kills: list[tuple[float, str]] = []

    def run(self) -> None:
        try:
            self._kill_all()
        finally:
            self.done.set()

    def _kill_all(self) -> None:
        while not self.stop.is_set() and len(self.kills) < NUM_KILLS:
            if running_replicas() < 2 or len(replica_names(APP, "LLMWorker")) < 2:
                time.sleep(0.2)
                continue
            # once the replacement takes its share of new streams
            if self.stop.wait(self.rng.uniform(1.5, 3.0)):
                return
            names = replica_names(APP, "LLMWorker")
            if len(names) < 2:
                continue
            victim = self.rng.choice(names)
            try:
                pid = replica_pid(victim)
            except Exception:  # noqa: BLE001 - it is restarting: try again later
                continue
            os.kill(pid, signal.SIGKILL)
            self.kills.append((time.monotonic(), victim))
            time.sleep(1.0)  # let Serve see it die before waiting for its replacement
        self.stop.wait(3.0)  # the last kill's streams continue elsewhere and finish


def live_worker_stats() -> dict[str, dict]:
    live = set(replica_names(APP, "LLMWorker"))
    return {name: stats for name, stats in worker_stats(APP).items() if name in live}


def wait_until_idle(base_url: str, timeout_s: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        in_flight = metric_values(base_url).get("tandem_ingress_requests_in_flight")
        stats = live_worker_stats()
        idle = len(stats) == 2 and all(s["num_running"] == 0 and s["num_waiting"] == 0
                                       and s["num_free_blocks"] == s["num_total_blocks"] for s in stats.values())
        if in_flight == 0 and idle and running_replicas() == 2:
            return stats
        assert time.monotonic() < deadline, (in_flight, stats)
        time.sleep(0.3)


def test_streams_survive_decode_replicas_killed_mid_stream(base_url, client):
    mix = specs()
    reference = run_all(client, mix)  # undisturbed
    assert all(r.error is None for r in reference), [r.error for r in reference if r.error]
    migrations_before = metric_values(base_url).get("tandem_ingress_migrations_total", 0)

    killer = Killer(random.Random(7))
    killer.start()
    started = time.monotonic()
    disturbed = run_until(client, mix, killer.done)
    elapsed = time.monotonic() - started
    killer.stop.set()
    killer.join(30)

    lost = [(spec.index, r.error) for spec, r in disturbed if r.error]
    assert not lost, lost
    for spec, got in disturbed:
        want = reference[spec.index]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), (spec, want, got)
        assert got.usage == want.usage, (spec, want.usage, got.usage)
        assert got.usage["completion"] <= spec.max_tokens
    # Which streams a kill landed in the middle of: their (first) replica died between their
    # first and last chunk read (a few had all their tokens sent by then: more than migrated).
    hit = [(spec, r) for spec, r in disturbed
           if any(victim == r.replica and r.started_at < t < r.ended_at for t, victim in killer.kills)]
    migrations = metric_values(base_url).get("tandem_ingress_migrations_total", 0) - migrations_before
    assert len(killer.kills) == NUM_KILLS, killer.kills
    assert migrations >= 3 * NUM_KILLS, (len(hit), migrations)  # each kill left several streams to continue
    kinds = {"chat": sum(s.chat for s, _ in hit), "seeded": sum("seed" in s.sampling for s, _ in hit)}
    assert kinds["chat"] and len(hit) - kinds["chat"] and kinds["seeded"] and len(hit) - kinds["seeded"], kinds
    stats = wait_until_idle(base_url)
    blocks = {name.rsplit("#", 1)[-1]: f"{s['num_free_blocks']}/{s['num_total_blocks']}" for name, s in stats.items()}
    print(f"\nmigration: {len(disturbed)} requests ({len(mix)} distinct), {len(killer.kills)} SIGKILLs in "
          f"{elapsed:.1f} s, {len(hit)} streams hit mid-stream ({kinds['chat']} chat, {kinds['seeded']} seeded), "
          f"{int(migrations)} continuations, 0 lost; blocks free {blocks}")


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def break_engine_loop(name: str) -> int:
    """Makes the next engine step of replica `name` raise, as a device fault would: its engine
    loop dies while its process lives. Returns how many engines the replica holds."""
    def inject(_replica) -> int:
        from tandem.engine import async_engine

        def failing_step():
            raise RuntimeError("injected: the step failed")

        engines = list(async_engine._LIVE)
        for llm in engines:
            llm.engine.step = failing_step
        return len(engines)

    return ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(inject), timeout=30)


def test_a_replica_whose_engine_loop_dies_ends_itself_and_its_streams_continue(base_url, client):
    deadline = time.monotonic() + 120
    while running_replicas() < 2 or len(replica_names(APP, "LLMWorker")) < 2:
        assert time.monotonic() < deadline, "the app's two replicas"
        time.sleep(0.3)
    # long streams, so that the fault lands while several run on the victim
    mix = [dataclasses.replace(spec, max_tokens=300) for spec in specs() if spec.stream][:24]
    reference = run_all(client, mix)
    assert all(r.error is None for r in reference), [r.error for r in reference if r.error]
    before = metric_values(base_url)
    migrations_before = before.get("tandem_ingress_migrations_total", 0)
    retries_before = before.get("tandem_ingress_replica_retries_total", 0)
    victim = replica_names(APP, "LLMWorker")[0]
    pid = replica_pid(victim)

    def fault_once_streams_run_on_the_victim() -> None:
        busy = time.monotonic() + 60
        while not ((stats := worker_stats(APP).get(victim)) and stats["num_running"] >= 4):
            assert time.monotonic() < busy, "streams on the victim"
            time.sleep(0.1)
        assert break_engine_loop(victim) == 1

    results = run_all(client, mix, fault_once_streams_run_on_the_victim)

    lost = [(spec.index, r.error) for spec, r in zip(mix, results) if r.error]
    assert not lost, lost
    for spec, got, want in zip(mix, results, reference):
        assert (got.text, got.finish_reason, got.usage) == (want.text, want.finish_reason, want.usage), (spec, want, got)
    after = metric_values(base_url)
    migrations = after.get("tandem_ingress_migrations_total", 0) - migrations_before
    # A stream the fault met before its first token was sent is sent again (a retry), not continued.
    retried = after.get("tandem_ingress_replica_retries_total", 0) - retries_before
    assert migrations + retried >= 1, (migrations, retried)
    on_victim = sum(r.replica == victim for r in results)
    gone = time.monotonic() + 30
    while process_alive(pid):  # the replica ended its own process (no one killed it)
        assert time.monotonic() < gone, "the replica with the dead engine loop is still running"
        time.sleep(0.2)
    stats = wait_until_idle(base_url, timeout_s=120)
    assert victim not in stats
    print(f"\nengine loop died on one replica: {len(mix)} streams, {on_victim} on it, {int(migrations)} continued, "
          f"0 lost; its process ended itself and was replaced")
