"""Bounds on stranded KV blocks: a remote prefill whose peer dies (SIGKILL) or hangs (SIGSTOP)
at each point of its transfer never holds blocks past the transfer's timeouts, on either side.
Transfer timeouts are a few seconds here (`TRANSFER`); the prefill call's own bound
(`prefill_timeout_s`) is set far above them, so no case can pass by it.

Decode side (the prefill replica fails; a real `DecodeWorker` here, the `PrefillWorker` in its
own process, `disagg_procs.PrefillProcess`): the blocks reserved for the transfer are released
to the request, which recomputes the rest of its prompt locally and completes with the greedy
tokens of the colocated engine; afterwards every block is free and the receiver holds nothing.
- before Begin (the prompt is being computed there; nothing sent): killed; frozen (released
  within `prefill_liveness_timeout_s`: the replica's keep-alives stop, and nothing has begun for
  the transfer's heartbeat to watch).
- mid-layers (layer 0 of 2 sent): killed; frozen (released within `peer_timeout_s`: the
  receiver's heartbeat check fails the transfer, and the decode side stops waiting for the call).
- after Done, before the decode side resumes (every layer landed and was acknowledged, the first
  token never comes back): killed; frozen (released within `kv_wait_timeout_s`).

Prefill side (the decode replica fails; a real `PrefillWorker` here, the decode side's
`KVReceiver` in its own process, `disagg_procs.ReceiverProcess`): the prefill's blocks are freed
and its call returns an error within the save deadline (`2 * timeout_s + connect_timeout_s`).
- before Begin (the receiver registered its blocks, then died): killed.
- mid-layers (layer 0 landed): killed; frozen.
- before Done (every layer received, the last not landed, no acknowledgement): killed; frozen.
- after Done: the prefill side frees its blocks at the acknowledgement (every case's warm-up).
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest

pytest.importorskip("zmq")

from tandem.engine.llm import LLM  # noqa: E402
from tandem.protocol.prefill import PrefillRequest  # noqa: E402
from tandem.protocol.sampling_params import SamplingParams  # noqa: E402
from tandem.protocol.worker import WorkerRequest  # noqa: E402
from tandem.workers.decode_worker import DecodeWorker  # noqa: E402
from tandem.workers.prefill_worker import PrefillWorker  # noqa: E402
from tests.workers.disagg_procs import PrefillPool, PrefillProcess, ReceiverProcess  # noqa: E402

TRANSFER = {"bind_host": "127.0.0.1", "timeout_s": 2.0, "connect_timeout_s": 2.0, "heartbeat_s": 0.2,
            "peer_timeout_s": 1.5, "min_message_bytes": 0}
SAVE_DEADLINE_S = 2 * TRANSFER["timeout_s"] + TRANSFER["connect_timeout_s"]
DISAGG = {"remote_prefill_min_tokens": 32, "prefill_timeout_s": 60.0, "kv_wait_timeout_s": 2.5,
          "prefill_liveness_timeout_s": 3.0}
ENGINE = {"num_kv_blocks": 128, "block_size": 16}
SLACK_S = 2.0  # a busy 2-core machine
MAX_TOKENS = 6
pytestmark = pytest.mark.timeout(300)


_SEEDS = iter(range(1, 10**6))


def prompt() -> list[int]:
    """A prompt no worker has seen: a prefix-cache hit would keep it off the prefill pool."""
    rng = random.Random(next(_SEEDS))
    return [rng.randrange(5, 600) for _ in range(rng.randrange(80, 120))]


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=256)

    def run(p: list[int]) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return llm.generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids

    return run


# ----------------------------------------------------------------------------- decode side
@pytest.fixture(scope="module")
def decode(llama_dir):
    pool = PrefillPool()
    worker = DecodeWorker(llama_dir, pool, ENGINE, "cpu", DISAGG, TRANSFER)
    worker._ensure_publishing = lambda: None  # outside Serve: nothing to publish to
    yield worker, pool
    worker._engine.shutdown()
    worker._connector.close()


async def generate(worker: DecodeWorker, rid: str, p: list[int]) -> list[int]:
    tokens: list[int] = []
    async for delta in worker.generate(WorkerRequest(rid, p, temperature=0.0, max_tokens=MAX_TOKENS,
                                                     ignore_eos=True)):
        assert delta.error is None, delta.error
        tokens += delta.outputs[0].token_ids
    return tokens


async def settled(read, predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate(value := read()):
        assert time.monotonic() < deadline, f"{what}: {value}"
        await asyncio.sleep(0.02)
    return value


@pytest.mark.parametrize("point, fault, bound_s", [
    ("before_begin", "kill", 0.0),
    ("before_begin", "freeze", DISAGG["prefill_liveness_timeout_s"]),
    ("mid_layers", "kill", 0.0),
    ("mid_layers", "freeze", TRANSFER["peer_timeout_s"]),
    ("after_done", "kill", 0.0),
    ("after_done", "freeze", DISAGG["kv_wait_timeout_s"]),
])
def test_a_prefill_replica_failing_mid_transfer_releases_the_decode_blocks(llama_dir, decode, reference, point,
                                                                          fault, bound_s):
    worker, pool = decode
    connector = worker._connector
    child = PrefillProcess(llama_dir, ENGINE, TRANSFER, point)
    pool.process = child
    try:
        async def main() -> None:
            warm = prompt()
            assert await generate(worker, f"warm-{point}-{fault}", warm) == reference(warm)  # pairs the two
            before = connector.counters()
            received = connector.transfer_metrics()
            assert before.remote_prefills_ok >= 1
            child.arm()
            doomed = prompt()
            task = asyncio.ensure_future(generate(worker, f"doomed-{point}-{fault}", doomed))
            await asyncio.to_thread(child.reached.wait, 60)
            assert child.reached.is_set(), "the prefill process never reached its failure point"
            if point == "mid_layers":  # layer 0 landed here, layer 1 never comes
                await settled(connector.transfer_metrics, lambda m: m.messages_received > received.messages_received,
                              10, "layer 0 did not land")
            if point == "after_done":  # every layer landed and was acknowledged
                await settled(connector.transfer_metrics, lambda m: m.transfers_ok > received.transfers_ok,
                              10, "the KV did not land")
            if point == "before_begin" and fault == "freeze":
                # alive but slow (its engine thread is held): its keep-alives keep the decode
                # side waiting past the liveness bound; only the freeze silences them
                await asyncio.sleep(1.5 * DISAGG["prefill_liveness_timeout_s"])
                assert connector.counters().remote_prefills_failed == before.remote_prefills_failed, \
                    "a live prefill replica was given up"
            failed_at = time.monotonic()
            child.kill() if fault == "kill" else child.freeze()
            await settled(connector.counters, lambda c: c.remote_prefills_failed > before.remote_prefills_failed,
                          bound_s + SLACK_S, f"the decode side still waits for the {point} transfer")
            released_s = time.monotonic() - failed_at
            assert await asyncio.wait_for(task, 60) == reference(doomed)  # recomputed here
            stats = await settled(worker.stats, lambda s: s.engine.num_running == 0, 10, "still running")
            assert stats.engine.num_free_blocks == stats.engine.num_total_blocks
            after = connector.transfer_metrics()
            counters = connector.counters()
            # every transfer the receiver was told to expect has ended (landed or failed)
            assert after.transfers_ok + after.transfers_failed == counters.remote_prefills_started
            print(f"\n{point}/{fault}: decode blocks released {released_s:.2f} s after the fault "
                  f"(bound {bound_s:g} s); {counters.last_failure[:80]}")

        asyncio.run(main())
    finally:
        child.close()


# ---------------------------------------------------------------------------- prefill side
@pytest.fixture(scope="module")
def prefill(llama_dir):
    worker = PrefillWorker(llama_dir, ENGINE, "cpu", TRANSFER)
    worker._ensure_publishing = lambda: None
    yield worker
    worker._engine.shutdown()
    worker._exporter.close()


def free_blocks(worker) -> tuple[int, int]:
    stats = worker.stats().engine
    return stats.num_free_blocks, stats.num_total_blocks


def prefill_request(rid: str, p: list[int], address: str, dst: list[int]) -> PrefillRequest:
    return PrefillRequest(rid, p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), address,
                          dst, 0)


@pytest.mark.parametrize("point, fault", [
    ("before_begin", "kill"),
    ("mid_layers", "kill"), ("mid_layers", "freeze"),
    ("before_done", "kill"), ("before_done", "freeze"),
])
def test_a_decode_replica_failing_mid_transfer_frees_the_prefill_blocks(prefill, point, fault):
    cache_shape = tuple(prefill._engine.engine.runner.kv_cache.shape)
    child = ReceiverProcess(cache_shape, TRANSFER, point)
    try:
        async def main() -> None:
            warm = prompt()
            dst = list(range(10, 10 + -(-len(warm) // ENGINE["block_size"])))
            child.call("expect", f"warm-{point}-{fault}", dst, cache_shape[0])
            result = await prefill.prefill(prefill_request(f"warm-{point}-{fault}", warm, child.address, dst))
            assert result.error is None, result.error
            # after Done: the blocks are freed at the acknowledgement
            await settled(lambda: free_blocks(prefill), lambda f: f[0] == f[1], 5, "warm-up blocks held")
            child.arm()
            doomed = prompt()
            dst = list(range(50, 50 + -(-len(doomed) // ENGINE["block_size"])))
            child.call("expect", f"doomed-{point}-{fault}", dst, cache_shape[0])
            request = prefill_request(f"doomed-{point}-{fault}", doomed, child.address, dst)
            exports_failed = prefill.stats().exports_failed
            if point == "before_begin":
                child.kill()
                failed_at = time.monotonic()
                task = asyncio.ensure_future(prefill.prefill(request))
            else:
                task = asyncio.ensure_future(prefill.prefill(request))
                await asyncio.to_thread(child.wait_reached, 60)
                failed_at = time.monotonic()
                child.kill() if fault == "kill" else child.freeze()
            result = await asyncio.wait_for(task, SAVE_DEADLINE_S + 30)
            answered_s = time.monotonic() - failed_at
            assert result.error is not None  # the decode side recomputes (it is gone here)
            await settled(lambda: free_blocks(prefill), lambda f: f[0] == f[1], 5, "prefill blocks held")
            freed_s = time.monotonic() - failed_at
            assert freed_s < SAVE_DEADLINE_S + SLACK_S, (freed_s, result.error)
            assert prefill.stats().exports_failed == exports_failed + 1
            print(f"\n{point}/{fault}: prefill blocks freed {freed_s:.2f} s after the fault (answer "
                  f"{answered_s:.2f} s; bound {SAVE_DEADLINE_S:g} s): {result.error[:80]}")

        asyncio.run(main())
    finally:
        child.close()
    # the prefill worker keeps serving other decode workers
    survivor = ReceiverProcess(cache_shape, TRANSFER, "mid_layers")  # never armed
    try:
        p = prompt()
        dst = list(range(90, 90 + -(-len(p) // ENGINE["block_size"])))
        survivor.call("expect", f"after-{point}-{fault}", dst, cache_shape[0])
        result = asyncio.run(prefill.prefill(prefill_request(f"after-{point}-{fault}", p, survivor.address, dst)))
        assert result.error is None, result.error
    finally:
        survivor.close()
