"""Overlap scheduling (EngineConfig.async_scheduling): step N+1 is scheduled and launched before
step N's tokens are read. Every output must be exactly what the step-by-step engine produces,
whatever finishes a sequence (length, EOS-like stop tokens, stop strings, aborts) and whatever
the scheduler does meanwhile (chunked prefill, preemption, prefix hits, n > 1)."""
from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.sequence import PLACEHOLDER


def _run(llama_dir, prompts, params, overlap: bool, **kw):
    llm = LLM(llama_dir, async_scheduling=overlap, **kw)
    outs = llm.generate(prompts, params)
    bm = llm.engine.block_manager
    bm.check_invariants([])  # nothing held once every request is done
    assert bm.num_free_blocks == bm.num_blocks
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in out.outputs] for out in outs], llm


def _prompts(n: int, base: int = 3) -> list[dict]:
    shared = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]  # > one block: prefix hits
    return [{"prompt_token_ids": shared[: 4 + (i * 5) % 14] + [base + i, 40 + i, 7]} for i in range(n)]


def _stop_token(llama_dir, prompt) -> int:
    """A token the model really emits mid-run for `prompt`, so a stop on it ends it early."""
    out = LLM(llama_dir).generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return out[0].outputs[0].token_ids[3]


@pytest.mark.parametrize("kw", [
    {},  # plenty of cache, big step budget
    {"max_num_batched_tokens": 8},  # chunked prefill mixed with decodes
    {"num_kv_blocks": 5, "max_num_batched_tokens": 32},  # preemption under cache pressure
])
def test_overlap_matches_step_by_step(llama_dir, kw):
    prompts = _prompts(7)
    stop = _stop_token(llama_dir, prompts[3])
    params = [
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, n=2, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["e"]),
    ]
    sync, _ = _run(llama_dir, prompts, params, overlap=False, **kw)
    over, llm = _run(llama_dir, prompts, params, overlap=True, **kw)
    assert over == sync
    assert [len(o[0][0]) for o in over][:3] == [1, 2, 17]
    assert len(over[3][0][0]) < 12 and over[3][0][3] == stop  # the stop token really ended it
    if "num_kv_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_placeholders_are_in_flight_and_never_reported(llama_dir):
    llm = LLM(llama_dir, async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    eng.add_request("b", {"prompt_token_ids": [9, 10]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert eng.step() == []  # the prefill is launched; its tokens are read during the next step
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    assert all(s.num_pending == 1 and s.token_ids[-1] == PLACEHOLDER for s in seqs)
    assert all(s.output_token_ids == [] for s in seqs)
    outs = eng.step()  # launches step 2 (inputs gathered on the device), then reads step 1
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    for o in outs:
        assert len(o.outputs[0].token_ids) == 1 and PLACEHOLDER not in o.outputs[0].token_ids
    assert all(s.num_pending == 1 for s in seqs)  # step 2's tokens are in flight now
    # An abort while a step is in flight reports only known tokens and frees the blocks.
    aborted = eng.abort_request("a")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert PLACEHOLDER not in aborted.outputs[0].token_ids
    rest = []
    while eng.has_unfinished_requests():
        rest += eng.step()
    assert rest[-1].request_id == "b" and len(rest[-1].outputs[0].token_ids) == 8
    reference = LLM(llama_dir, async_scheduling=False).generate(
        {"prompt_token_ids": [9, 10]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert rest[-1].outputs[0].token_ids == reference[0].outputs[0].token_ids
    eng.block_manager.check_invariants([])


def test_a_logprobs_request_turns_overlap_off_until_it_is_done(llama_dir):
    llm = LLM(llama_dir, async_scheduling=True)
    eng = llm.engine
    eng.add_request("plain", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    eng.step()
    assert eng._in_flight is not None
    eng.add_request("lp", {"prompt_token_ids": [8, 9]},
                    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2))
    outs = {}
    while "lp" not in outs or not outs["lp"].finished:
        for o in eng.step():
            outs[o.request_id] = o
        if "lp" in eng.requests:
            assert eng._in_flight is None  # every step is read before the next is scheduled
    lp = outs["lp"].outputs[0]
    assert len(lp.logprobs) == 3 and all(t in d for t, d in zip(lp.token_ids, lp.logprobs))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng._num_sync_requests == 0


@pytest.mark.gpu
def test_overlap_matches_step_by_step_on_cuda_with_graphs(llama_dir):
    """The device path: placeholder inputs gathered on the GPU, CUDA-graph decode, pinned
    token copies read behind an event, alternating input staging buffers."""
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=3 + 4 * i, ignore_eos=True) for i in range(5)]
    params.append(SamplingParams(temperature=0.7, seed=5, max_tokens=11, ignore_eos=True))
    # A fixed small cache: three engines live in this process one after another.
    kw = dict(device="cuda", dtype="float32", max_num_batched_tokens=16, num_kv_blocks=128)
    sync, _ = _run(llama_dir, prompts, params, overlap=False, **kw)
    over, llm = _run(llama_dir, prompts, params, overlap=True, **kw)
    assert llm.engine.runner.graphs is not None
    twice, _ = _run(llama_dir, prompts, params, overlap=False, **kw)
    assert twice == sync, "step-by-step runs differ from each other on this GPU"
    for i, (a, b) in enumerate(zip(over, sync)):
        assert a == b, f"request {i}: overlap {a} vs step-by-step {b}"
