"""Greedy tokens identical to HF transformers, for every architecture, as ONE continuously
batched workload: plain, under a tiny per-step token budget (chunked prefill), with a tiny
block pool (preemption), and with shared prefixes (prefix-cache hits)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.engine.hf_oracle import hf_greedy
from tandem import LLM, SamplingParams
from tandem.engine.make_model import ARCHITECTURES

PROMPT_LENS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 47, 64, 100, 127, 128, 129, 200, 255, 256, 300, 333, 384, 420,
               480, 500]
MAX_TOKENS = [1, 7, 16, 24, 3, 12, 20, 9]


def make_prompts(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]
    return prompts, [MAX_TOKENS[i % len(MAX_TOKENS)] for i in range(len(prompts))]


def run_and_compare(llm: LLM, model_dir: str, prompts, max_tokens) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for i, (p, m, out) in enumerate(zip(prompts, max_tokens, outs)):
        expected = hf_greedy(model_dir, p, m)
        assert out.outputs[0].token_ids == expected, f"prompt {i} (len {len(p)}) diverged from HF"


MODES = {
    "plain": dict(),
    "chunked": dict(max_num_batched_tokens=24),
    "preempt": dict(num_kv_blocks=40, max_num_batched_tokens=512),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf(model_dirs, arch, mode):
    model_dir = model_dirs[arch]
    llm = LLM(model_dir, device="cpu", dtype="float32", **MODES[mode])
    prompts, max_tokens = make_prompts(llm.engine.vocab_size)
    run_and_compare(llm, model_dir, prompts, max_tokens)
    stats = llm.engine.stats()
    if mode == "chunked":
        assert max(PROMPT_LENS) > MODES["chunked"]["max_num_batched_tokens"]
    if mode == "preempt":
        assert stats.num_preemptions > 0, "the tiny pool should have forced preemption"
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked after the workload"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_hits_match_hf(model_dirs, arch):
    model_dir = model_dirs[arch]
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=64)
    rng = random.Random(7)
    vocab = llm.engine.vocab_size
    shared = [rng.randrange(5, vocab) for _ in range(300)]
    prompts = [shared + [rng.randrange(5, vocab) for _ in range(rng.randrange(1, 60))] for _ in range(24)]
    max_tokens = [MAX_TOKENS[i % len(MAX_TOKENS)] for i in range(24)]
    run_and_compare(llm, model_dir, prompts[:4], max_tokens[:4])  # warms the cache
    before = llm.engine.stats().prefix_cache_hits
    run_and_compare(llm, model_dir, prompts[4:], max_tokens[4:])
    hits = llm.engine.stats().prefix_cache_hits - before
    assert hits >= 20 * 288, f"expected the shared 300-token prefix to hit, got {hits} hit tokens"


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_column_major_weights_compute_the_same_function(model_dirs, arch):
    """The GPU runner re-lays some projection weights column-major (faster small-batch GEMMs);
    the model must compute the same logprobs, and the re-laid weights really are transposed views."""
    prompts = [{"prompt_token_ids": [3 + i, 17, 29, 41 + i, 5]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    llm = LLM(model_dirs[arch])
    before = [o.outputs[0].logprobs[0] for o in llm.generate(prompts, params)]
    model = llm.engine.runner.model
    model.use_column_major_weights()
    relaid = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.endswith(model.column_major_suffixes) and m.weight.stride(0) == 1]
    assert relaid and any(n.endswith("down_proj") or n.endswith("o_proj") for n in relaid)
    llm.engine.block_manager.reset_prefix_cache()
    after = [o.outputs[0].logprobs[0] for o in llm.generate(prompts, params)]
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for t in b:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
