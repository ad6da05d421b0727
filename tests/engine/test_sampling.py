"""Sampling, stopping and logprobs, checked against HF transformers where it has the same
knob (repetition penalty, raw log-probabilities) and against their definitions elsewhere."""
from __future__ import annotations

import random

import pytest
import torch

from tests.engine.hf_oracle import hf_model
from tandem import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir)


def prompts(vocab, n=6, seed=3):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(5, vocab) for _ in range(rng.randrange(3, 40))]} for _ in range(n)]


def token_lists(outs):
    return [c.token_ids for o in outs for c in o.outputs]


def test_same_seed_same_output_and_different_seeds_differ(llm):
    ps = prompts(llm.engine.vocab_size)
    a = token_lists(llm.generate(ps, SamplingParams(temperature=1.0, seed=11, max_tokens=16)))
    b = token_lists(llm.generate(ps, SamplingParams(temperature=1.0, seed=11, max_tokens=16)))
    c = token_lists(llm.generate(ps, SamplingParams(temperature=1.0, seed=12, max_tokens=16)))
    assert a == b
    assert a != c


def test_n_outputs_are_distinct_and_reproducible(llm):
    p = prompts(llm.engine.vocab_size, n=1)
    outs = llm.generate(p, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12))
    assert len(outs[0].outputs) == 3 and len({tuple(c.token_ids) for c in outs[0].outputs}) == 3
    again = llm.generate(p, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12))
    assert token_lists(outs) == token_lists(again)


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_leave_one_token_equal_greedy(llm, kwargs):
    ps = prompts(llm.engine.vocab_size)
    greedy = token_lists(llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10)))
    filtered = token_lists(llm.generate(ps, SamplingParams(temperature=1.5, max_tokens=10, **kwargs)))
    assert filtered == greedy


def test_top_k_limits_support():
    from tandem.engine.sampler import Sampler

    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    params = [SamplingParams(top_k=5)] * 4
    filtered = Sampler._filter(probs, params)
    assert ((filtered > 0).sum(dim=-1) == 5).all()
    assert torch.allclose(filtered.sum(-1), torch.ones(4))
    top5 = probs.topk(5).indices
    assert (filtered.gather(1, top5) > 0).all()


def test_repetition_penalty_matches_hf(llm, llama_dir):
    model = hf_model(llama_dir)
    for p in prompts(llm.engine.vocab_size, n=3):
        ids = p["prompt_token_ids"]
        ours = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.7))
        hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.7,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert ours[0].outputs[0].token_ids == hf[0, len(ids):].tolist()


def test_frequency_penalty_discourages_repeats(llm):
    ps = prompts(llm.engine.vocab_size)
    plain = token_lists(llm.generate(ps, SamplingParams(temperature=0, max_tokens=24)))
    penalised = token_lists(llm.generate(ps, SamplingParams(temperature=0, max_tokens=24, frequency_penalty=2.0)))

    def repeats(lists):
        return sum(len(t) - len(set(t)) for t in lists)

    assert repeats(penalised) < repeats(plain)


def test_logprobs_match_hf_raw_distribution(llm, llama_dir):
    model = hf_model(llama_dir)
    p = prompts(llm.engine.vocab_size, n=1)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    ids = p["prompt_token_ids"] + out.token_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    n_prompt = len(p["prompt_token_ids"])
    for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n_prompt - 1 + step]
        assert lp[token].rank == 1  # greedy picks the top token
        assert abs(lp[token].logprob - row[token].item()) < 1e-4
        top = row.topk(3)
        assert set(lp) == set(top.indices.tolist())
    assert abs(out.cumulative_logprob - sum(lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids))) < 1e-6


def test_stop_strings_trim_and_report(llm):
    p = {"prompt": "The quick brown fox"}
    full = llm.generate([p], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                           include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == text[: cut + len(stop)]


def test_stop_token_ids_eos_and_ignore_eos(llm):
    p = prompts(llm.engine.vocab_size, n=1)
    full = llm.generate(p, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids
    stop_tok = full[4]
    first = full.index(stop_tok)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # Treat that token as EOS: generation stops there unless ignore_eos.
    llm.engine.eos_token_ids.add(stop_tok)
    try:
        eos = llm.generate(p, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        assert eos.token_ids == full[: first + 1] and eos.finish_reason == "stop"
        ignored = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
        assert ignored.token_ids == full and ignored.finish_reason == "length"
        min_tok = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2))[0].outputs[0]
        assert len(min_tok.token_ids) >= first + 2 and stop_tok not in min_tok.token_ids[: first + 1]
    finally:
        llm.engine.eos_token_ids.discard(stop_tok)


def test_filtering_in_row_chunks_equals_all_rows_at_once(monkeypatch):
    import tandem.engine.sampler as sampler_mod
    from tandem.engine.sampler import Sampler

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(10, 50), dim=-1)
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m)
              for k, p, m in zip([5, 0, 3, 0, 7, 2, 0, 9, 1, 4], [0.9, 0.5, 1.0, 0.8, 0.95, 1.0, 0.3, 0.7, 1.0, 0.6],
                                 [0.0, 0.1, 0.0, 0.05, 0.0, 0.0, 0.2, 0.0, 0.0, 0.01])]
    whole = Sampler._filter(probs, params)
    monkeypatch.setattr(sampler_mod, "FILTER_ROWS", 3)
    assert torch.equal(Sampler._filter(probs, params), whole)
