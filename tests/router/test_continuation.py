"""`router.continuation.ResumableStream` over real engines, without Ray: two in-process
"replicas" (an `AsyncLLM` each, deltas made as `LLMWorker` makes them) behind a fake pool whose
responses raise Ray's `ActorDiedError` once their replica is killed. A stream whose replica dies
after any number of deltas continues on the other one and gives exactly the undisturbed deltas'
tokens and text, with the whole request's counts; n > 1 outputs continue one by one; the
number of continuations is bounded; a continuation no replica took is sent again. The same
through a real Serve app, SIGKILL and the `openai` client: `tests/reliability/test_migration.py`."""
from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from ray.exceptions import ActorDiedError

from tandem.engine.async_engine import AsyncLLM
from tandem.engine.config import EngineConfig
from tandem.protocol.worker import WorkerDelta, WorkerRequest
from tandem.router.continuation import MigrationPolicy, ResumableStream
from tandem.workers.serve_worker import to_delta

pytestmark = pytest.mark.timeout(180)


class Replica:
    """One engine; `kill()` makes every response of it fail as a dead Serve replica's does."""

    def __init__(self, model: str, name: str) -> None:
        self.name = name
        self.engine = AsyncLLM.from_config(EngineConfig(model=model, num_kv_blocks=256))
        self.alive = True
        self.requests: list[WorkerRequest] = []

    def kill(self) -> None:
        self.alive = False

    async def generate(self, request: WorkerRequest):
        self.requests.append(request)
        try:
            stream = self.engine.generate({"prompt_token_ids": list(request.prompt_token_ids)},
                                          request.sampling_params(), request.request_id,
                                          continuation=request.continuation)
            async for out in stream:
                yield to_delta(out, self.name, request.logprobs or 0)
        except ValueError as error:
            yield WorkerDelta(request.request_id, [], True, error=str(error))


class Response:
    """What `handle.generate.remote(request)` returns: an async iterator with `cancel()`."""

    def __init__(self, replica: Replica, request: WorkerRequest, kill_after: int | None = None,
                 fail_at_once: bool = False) -> None:
        self.replica = replica
        self._gen = replica.generate(request)
        self._kill_after = kill_after  # deltas, then the replica dies
        self._fail_at_once = fail_at_once
        self._count = 0
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> WorkerDelta:
        if self._fail_at_once or not self.replica.alive:
            await self._gen.aclose()
            raise ActorDiedError()
        if self._kill_after is not None and self._count >= self._kill_after:
            self.replica.kill()
            await self._gen.aclose()  # the engine request ends with the process
            raise ActorDiedError()
        self._count += 1
        return await self._gen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self._gen.aclose())


@pytest.fixture(scope="module")
def models(llama_dir):
    return llama_dir


async def collect(stream, first: WorkerDelta, n: int = 1):
    """Per output: tokens and text; the last delta (counts)."""
    tokens = [[] for _ in range(n)]
    texts = [""] * n
    finish = [None] * n
    last = first
    for delta in itertools.chain([first], [d async for d in stream] if stream is not None else []):
        for out in delta.outputs:
            tokens[out.index] += out.token_ids
            texts[out.index] += out.text
            finish[out.index] = finish[out.index] or out.finish_reason
        last = delta
    return tokens, texts, finish, last


def request(rid: str, prompt: list[int], **fields) -> WorkerRequest:
    return WorkerRequest(rid, prompt, max_tokens=20, ignore_eos=True, **fields)


async def undisturbed(replica: Replica, req: WorkerRequest):
    response = Response(replica, req)
    first = await response.__anext__()
    return await collect(response, first, req.n)


async def with_kill(a: Replica, b: Replica, req: WorkerRequest, kill_after: int, policy=MigrationPolicy()):
    a.alive = True
    response = Response(a, req, kill_after=kill_after)
    first = await response.__anext__()
    stream = ResumableStream(lambda r: Response(b, r), req, first, response, policy)
    result = await collect(stream, first, req.n)
    return result, stream


SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, seed=42, top_p=0.9),
            dict(temperature=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
            dict(temperature=0.0, stop=["e"])]


def test_a_stream_whose_replica_dies_continues_elsewhere_unchanged(models):
    async def main():
        a, b = Replica(models, "a"), Replica(models, "b")
        rng = random.Random(1)
        vocab = a.engine.engine.vocab_size
        for case, fields in enumerate(SAMPLING):
            prompt = [rng.randrange(5, vocab) for _ in range(rng.randrange(4, 30))]
            req = request(f"r{case}", prompt, **fields)
            tokens, texts, finish, last = await undisturbed(b, req)
            for kill_after in (1, 2, 7, 15):
                (got_tokens, got_texts, got_finish, got_last), stream = await with_kill(a, b, req, kill_after)
                assert (got_tokens, got_texts, got_finish) == (tokens, texts, finish), (fields, kill_after)
                assert got_last.finished and got_last.num_prompt_tokens == len(prompt)
                assert got_last.num_output_tokens == last.num_output_tokens == len(tokens[0])
                if kill_after < len(tokens[0]):  # it really migrated, once, as a continuation
                    assert stream.migrations == 1
                    cont = b.requests[-1]
                    assert cont.continuation is not None and cont.prompt_token_ids[:len(prompt)] == prompt
                    assert cont.max_tokens == req.max_tokens
        for r in (a, b):
            stats = await asyncio.wrap_future(r.engine.call_in_engine(lambda e: e.stats()))
            assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks

    asyncio.run(main())


def test_n_outputs_continue_each_on_its_own(models):
    async def main():
        a, b = Replica(models, "a"), Replica(models, "b")
        req = request("multi", [11, 22, 33, 44, 55], n=3, temperature=1.0, seed=9)
        tokens, texts, finish, last = await undisturbed(b, req)
        assert len({tuple(t) for t in tokens}) == 3
        (got_tokens, got_texts, got_finish, got_last), stream = await with_kill(a, b, req, 5)
        assert (got_tokens, got_texts, got_finish) == (tokens, texts, finish)
        assert got_last.finished and got_last.num_output_tokens == sum(map(len, tokens)) == last.num_output_tokens
        continued = b.requests[-3:]
        assert [r.n for r in continued] == [1, 1, 1] and [r.seed for r in continued] == [9, 10, 11]

    asyncio.run(main())


def test_migrations_are_bounded_and_a_refused_first_attempt_is_sent_again(models):
    async def main():
        a, b = Replica(models, "a"), Replica(models, "b")
        req = request("bounded", [7, 8, 9, 10], temperature=0.0)
        tokens, *_ = await undisturbed(b, req)
        # Every continuation's replica dies too: the budget runs out, the first error is raised.
        a.alive = True
        response = Response(a, req, kill_after=3)
        first = await response.__anext__()
        stream = ResumableStream(lambda r: Response(b, r, fail_at_once=True), req, first, response,
                                 MigrationPolicy(max_migrations=2, retry_delay_s=0.01))
        with pytest.raises(ActorDiedError):
            await collect(stream, first)
        assert stream.migrations == 2
        # The first continuation fails before its first delta (Serve routed it to the dead
        # replica), the second one serves: one stream, unchanged.
        attempts = itertools.count()
        a.alive = True
        response = Response(a, req, kill_after=3)
        first = await response.__anext__()
        stream = ResumableStream(lambda r: Response(b, r, fail_at_once=next(attempts) == 0), req, first, response,
                                 MigrationPolicy(max_migrations=2, retry_delay_s=0.01))
        got_tokens, *_ = await collect(stream, first)
        assert got_tokens == tokens and stream.migrations == 2
        # No migrations allowed: the replica's death ends the stream, as before.
        a.alive = True
        response = Response(a, req, kill_after=3)
        first = await response.__anext__()
        stream = ResumableStream(lambda r: Response(b, r), req, first, response, MigrationPolicy(max_migrations=0))
        with pytest.raises(ActorDiedError):
            await collect(stream, first)

    asyncio.run(main())


def test_migration_settings_reach_the_ingress_and_the_pools(models):
    from tandem.workers.app import AppArgs, _decode_pool, ingress_config

    for bad in ({"max_migrations": -1}, {"max_migrations": 1.5}, {"drain_timeout_s": {"decode": 0}},
                {"drain_timeout_s": {"gpu": 3}}):
        with pytest.raises(ValueError, match="max_migrations|drain_timeout_s"):
            AppArgs.from_dict(bad)
    with pytest.raises(ValueError, match="max_migrations"):
        MigrationPolicy(max_migrations=-1)
    parsed = AppArgs.from_dict({"model": models, "max_migrations": 2})
    assert ingress_config(parsed, models).max_migrations == 2
    assert ingress_config(AppArgs.from_dict({"model": models}), models).max_migrations == 3
    parsed = AppArgs.from_dict({"model": models, "mode": "disaggregated", "drain_timeout_s": {"decode": 7}})
    decode = _decode_pool(parsed, models)._bound_deployment
    prefill = decode.init_args[1]._bound_deployment
    assert decode._deployment_config.graceful_shutdown_timeout_s == 7.0
    assert prefill._deployment_config.graceful_shutdown_timeout_s == 120.0  # the default, DRAIN_TIMEOUT_S
