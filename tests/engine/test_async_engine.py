"""The async engine: concurrent streams, abort frees blocks at once, bad input fails alone."""
from __future__ import annotations

import asyncio

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.async_engine import AsyncLLM
from tandem.engine.config import EngineConfig


@pytest.fixture(scope="module")
def engine(llama_dir):
    eng = AsyncLLM.from_config(EngineConfig(model=llama_dir))
    yield eng
    eng.shutdown()


def test_streams_match_offline_and_abort_frees(engine, llama_dir):
    prompts = [{"prompt_token_ids": [5 + i, 9, 17, 33 + i]} for i in range(4)]
    offline = LLM(llama_dir).generate(prompts, SamplingParams(temperature=0, max_tokens=10))

    async def collect(i, p):
        text, tokens = "", []
        async for out in engine.generate(p, SamplingParams(temperature=0, max_tokens=10), f"s{i}"):
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
        return text, tokens

    async def aborted():
        seen = 0
        gen = engine.generate({"prompt_token_ids": [7, 8, 9]}, SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        await gen.aclose()
        return seen

    async def bad():
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate({"prompt_token_ids": []}, SamplingParams()):
                pass

    async def main():
        return await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)), aborted(), bad())

    *results, seen, _ = asyncio.run(main())
    for (text, tokens), ref in zip(results, offline):
        assert tokens == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
    assert seen == 3

    async def wait_idle():
        for _ in range(200):
            st = engine.stats()
            if st.num_running == 0 and st.num_waiting == 0:
                return st
            await asyncio.sleep(0.05)
        raise AssertionError("engine did not go idle")

    st = asyncio.run(wait_idle())
    assert st.num_free_blocks == st.num_total_blocks


def test_a_request_is_validated_once(engine, monkeypatch):
    """The caller validates (and learns of bad input at once); the engine thread admits that
    result as it is instead of tokenizing and checking the prompt again."""
    calls = []
    real = engine.engine.validate
    monkeypatch.setattr(engine.engine, "validate", lambda *a: calls.append(a) or real(*a))

    async def run():
        return [out async for out in engine.generate("hello there", SamplingParams(temperature=0, max_tokens=3))]

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert len(calls) == 1


def test_idle_nap_backs_off_and_resets():
    from tandem.engine.async_engine import IdleNap

    nap = IdleNap()
    waits = [nap.next() for _ in range(8)]
    assert waits[0] == IdleNap.FIRST_S and waits == sorted(waits) and waits[-1] == IdleNap.MAX_S
    assert sum(waits) < 8 * IdleNap.MAX_S  # short naps first: a request right after work is not delayed
    nap.reset()
    assert nap.next() == IdleNap.FIRST_S


def test_engines_left_running_are_stopped_at_exit(llama_dir, monkeypatch):
    """A caller that never calls shutdown(): the exit hook stops the engine thread before the
    interpreter tears down (a daemon thread inside a step then can crash the process)."""
    import weakref

    from tandem.engine import async_engine

    monkeypatch.setattr(async_engine, "_LIVE", weakref.WeakSet())  # only this test's engine
    eng = AsyncLLM.from_config(EngineConfig(model=llama_dir))
    assert eng._thread.is_alive() and eng in async_engine._LIVE
    async_engine._shutdown_all()  # what atexit runs
    assert not eng._thread.is_alive() and eng not in async_engine._LIVE


def test_coalesce_joins_the_steps_a_slow_reader_missed(engine, llama_dir):
    """A reader that sleeps between reads gets several steps' tokens per output with `coalesce`,
    and the joined deltas are exactly the offline tokens and text, n > 1 included."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, n=2, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 9, 17, 33]}
    offline = LLM(llama_dir).generate([prompt], params)[0]

    async def read(coalesce: bool):
        texts, tokens, reads = ["", ""], [[], []], 0
        async for out in engine.generate(prompt, params, f"coalesce-{coalesce}", coalesce=coalesce):
            reads += 1
            for o in out.outputs:
                texts[o.index] += o.delta_text
                tokens[o.index] += o.delta_token_ids
                assert o.token_ids[len(o.token_ids) - len(o.delta_token_ids):] == o.delta_token_ids
            await asyncio.sleep(0.03)  # slower than a tiny model's step
        return texts, tokens, reads

    texts, tokens, reads = asyncio.run(read(True))
    for o in offline.outputs:
        assert tokens[o.index] == o.token_ids
        assert texts[o.index] == o.text
    assert reads < 24 / 2  # most reads carried more than one step
    _, plain_tokens, plain_reads = asyncio.run(read(False))
    assert plain_tokens == tokens and plain_reads >= 24
