"""MoE models in one process: greedy tokens identical to HF transformers (float32) for Qwen3-MoE,
Mixtral and Qwen2-MoE on a continuously batched mixed-length workload; loading from both
checkpoint layouts (per-expert and transformers v5's stacked experts); which layers are sparse;
the routing rule of each architecture; the expert load statistics."""
from __future__ import annotations

import random
import types

import pytest
import torch

from tests.engine.hf_oracle import hf_greedy, hf_model
from tandem import LLM, SamplingParams
from tandem.engine.make_model import MOE_ARCHITECTURES
from tandem.engine.models.moe import MoeForCausalLM, SparseMoeBlock, is_sparse_layer

PROMPT_LENS = [1, 2, 7, 16, 17, 33, 64, 100, 129, 200]
MAX_TOKENS = [6, 12, 3, 9, 1, 16, 8, 5, 10, 4]


@pytest.fixture(scope="module")
def moe_dirs(model_dirs) -> dict[str, str]:
    """The session's model folders (tests/conftest.py), shared with the parity suite and
    the expert-parallel tests so HF's greedy answers are computed once."""
    return {arch: model_dirs[arch] for arch in MOE_ARCHITECTURES}


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in MAX_TOKENS[: len(prompts)]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [out.outputs[0].token_ids for out in outs]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_greedy_matches_hf(moe_dirs, arch):
    model_dir = moe_dirs[arch]
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=256)
    prompts = make_prompts(llm.engine.vocab_size)
    for i, (prompt, tokens) in enumerate(zip(prompts, greedy(llm, prompts))):
        assert tokens == hf_greedy(model_dir, prompt, MAX_TOKENS[i]), f"prompt {i} (len {len(prompt)})"
    assert isinstance(llm.engine.runner.model, MoeForCausalLM)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_stacked_expert_checkpoint_loads_the_same(moe_dirs, arch):
    """transformers v5 keeps experts stacked in memory (mlp.experts.gate_up_proj [E, 2I, H]);
    a checkpoint written that way loads to the same model as the per-expert files."""
    model_dir = moe_dirs[arch]
    state = hf_model(model_dir).state_dict()
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in state)
    llm = LLM(model_dir, device="cpu", dtype="float32", weights=list(state.items()))
    from_files = LLM(model_dir, device="cpu", dtype="float32")
    ours = dict(llm.engine.runner.model.named_parameters())
    for name, param in from_files.engine.runner.model.named_parameters():
        assert torch.equal(param, ours[name]), name


def test_missing_expert_is_reported(moe_dirs):
    from safetensors.torch import load_file

    state = load_file(f"{moe_dirs['mixtral']}/model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    with pytest.raises(ValueError, match="missing weights.*layers.1.mlp.experts.gate_up_proj"):
        LLM(moe_dirs["mixtral"], device="cpu", dtype="float32", weights=list(state.items()))


def test_sparse_layers_follow_config():
    cfg = types.SimpleNamespace(model_type="qwen3_moe", num_experts=8, mlp_only_layers=[1], decoder_sparse_step=1)
    assert [is_sparse_layer(cfg, i) for i in range(4)] == [True, False, True, True]
    cfg.decoder_sparse_step, cfg.mlp_only_layers = 2, []
    assert [is_sparse_layer(cfg, i) for i in range(4)] == [False, True, False, True]
    cfg.num_experts = 0
    assert not any(is_sparse_layer(cfg, i) for i in range(4))


def test_tiny_qwen3_moe_keeps_its_dense_layer(moe_dirs):
    model = LLM(moe_dirs["qwen3_moe"], device="cpu", dtype="float32").engine.runner.model
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]
    assert model.expert_load.moe_layers == [0, 2]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_router_matches_hf(moe_dirs, arch):
    """Top-k ids and weights as transformers' router gives them (renormalised for Mixtral and
    norm_topk_prob; raw softmax mass for Qwen2-MoE)."""
    model_dir = moe_dirs[arch]
    ours = LLM(model_dir, device="cpu", dtype="float32").engine.runner.model.layers[0].mlp
    theirs = hf_model(model_dir).model.layers[0].mlp.gate
    x = torch.randn(50, ours.gate.in_features)
    weights, ids = ours.route(x)
    _, hf_weights, hf_ids = theirs(x)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), rtol=1e-6, atol=1e-7)
    sums = weights.sum(-1)
    if arch == "qwen2_moe":
        assert (sums < 1).all()
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_expert_load_statistics(moe_dirs):
    llm = LLM(moe_dirs["mixtral"], device="cpu", dtype="float32")
    model = llm.engine.runner.model
    prompts = make_prompts(llm.engine.vocab_size)[:4]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=3))
    stats = model.expert_load.snapshot()
    top_k = model.config.num_experts_per_tok
    # every token computed (prompt, and each generated token but the last) is routed k times per layer
    computed = sum(len(p) + len(o.outputs[0].token_ids) - 1 for p, o in zip(prompts, outs))
    assert stats.moe_layers == [0, 1, 2]
    assert [sum(row) for row in stats.cumulative] == [computed * top_k] * 3
    assert [sum(row) for row in stats.last_step] == [len(prompts) * top_k] * 3  # the last step: decodes
    assert stats.num_steps >= 3
    assert sum(stats.total_per_expert()) == 3 * computed * top_k
    hot = stats.hot_experts(2)
    assert hot[0][2] == max(max(row) for row in stats.cumulative) and hot[0][2] >= hot[1][2]


def test_triton_path_matches_reference_in_the_model(moe_dirs, monkeypatch):
    """The block's kernel seam: TANDEM_TRITON_ON_CPU=1 sends it through the Triton kernel
    (interpreter); the output equals the reference path's."""
    model = LLM(moe_dirs["qwen2_moe"], device="cpu", dtype="float32").engine.runner.model
    block = model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    x = torch.randn(21, block.gate.in_features)
    with torch.inference_mode():
        ref = block(x)
        monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
