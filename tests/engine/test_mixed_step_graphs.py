"""Steps with prompt chunks replayed as padded CUDA graphs (workers/cuda_graphs.CudaGraphMixed)
must give what the eager forward gives: same greedy tokens, logprobs within float32 noise, on
batches that mix chunked prompts, prefix hits and decodes (GPU: CUDA graphs); and a step goes to
the smallest graph that holds it (CPU)."""
from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.cuda_graphs import CudaGraphMixed



def _prompts(n: int) -> list[dict]:
    shared = list(range(11, 45))  # two blocks and a bit: later prompts hit the prefix cache
    return [{"prompt_token_ids": shared[: 5 + (i * 7) % 30] + [50 + i] * (3 + 11 * i)} for i in range(n)]


def _run(llama_dir, eager: bool):
    # float32: padded and unpadded GEMMs may pick other kernels; in float32 that moves logits by
    # ~1e-6, far from flipping a greedy token of this model.
    llm = LLM(llama_dir, device="cuda", dtype="float32", max_num_batched_tokens=128, max_num_seqs=8,
              num_kv_blocks=256, enforce_eager=eager)
    runner = llm.engine.runner
    replays = []
    if not eager:
        assert runner.mixed_graphs is not None and runner.mixed_graphs.token_sizes == [64, 128]
        run = runner.mixed_graphs.run
        runner.mixed_graphs.run = lambda *a, **k: replays.append(a[0].shape[0]) or run(*a, **k)
    params = [SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=True, logprobs=2) for i in range(8)]
    outs = llm.generate(_prompts(8), params)
    return outs, replays


def test_padded_sizes():
    """Which graph a step replays: the smallest captured token count that holds it, none past the
    largest or past the sequence limit (those steps run eagerly). Plain Python: no GPU needed."""
    kv = torch.zeros(1, 2, 4, 16, 1, 8)  # [layers, k/v, blocks, block size, kv heads, head dim]
    mixed = CudaGraphMixed(torch.nn.Identity(), kv, max_blocks_per_seq=4, max_num_seqs=8, max_tokens=600)
    assert mixed.token_sizes == [64, 128, 256, 384, 512]  # the sizes up to the step budget
    assert [mixed.padded_size(t, 3) for t in (1, 64, 65, 300, 512)] == [64, 64, 128, 384, 512]
    assert mixed.padded_size(513, 3) is None and mixed.padded_size(10, 9) is None
    assert CudaGraphMixed(torch.nn.Identity(), kv, 4, 8, max_tokens=32).token_sizes == []


@pytest.mark.gpu
def test_mixed_step_graphs_match_eager(llama_dir):
    eager, _ = _run(llama_dir, eager=True)
    graphed, replays = _run(llama_dir, eager=False)
    assert replays and max(replays) <= 128  # every prompt step (up to 128 tokens) ran as a graph
    for a, b in zip(eager, graphed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-4
    torch.cuda.synchronize()
