"""Batch-1 steps through the Triton GEMV (kernels/gemv.py via kernels.ops.linear), in the model."""
import pytest
import torch

from tandem.kernels import gemv as gemv_mod
from tandem.engine.llm import LLM
from tandem.protocol.sampling_params import SamplingParams


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_row_steps_through_the_gemv_give_the_reference_tokens(model_dirs, monkeypatch, arch):
    """With the Triton path on (CPU, interpreter, float32), every projection of a one-row decode step
    runs the GEMV, SiLU fused into down; tokens and logprobs equal the plain-torch path's."""
    rows = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda x, *a, **kw: rows.append(x.shape[0]) or real(x, *a, **kw))
    llm = LLM(model_dirs[arch], device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3)
    prompt = {"prompt_token_ids": [5, 17, 29, 41, 7]}
    ref = llm.generate([prompt], params)[0].outputs[0]
    assert rows == []  # the reference path never calls it
    monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
    llm.engine.block_manager.reset_prefix_cache()
    out = llm.generate([prompt], params)[0].outputs[0]
    layers = llm.engine.runner.model.config.num_hidden_layers
    # 4 decode steps x (4 projections per layer + lm_head), and the prompt step's lm_head on its last
    # token's row; all one row.
    assert rows == [1] * (4 * (4 * layers + 1) + 1)
    assert out.token_ids == ref.token_ids
    for got, want in zip(out.logprobs, ref.logprobs):
        assert got.keys() == want.keys()
        for t in want:
            assert got[t].logprob == pytest.approx(want[t].logprob, abs=1e-4)
