"""FP8 (e4m3) KV cache in the engine (`kv_cache_dtype="fp8"`, engine/kv_quant.py): accuracy
against the same engine with a float32 cache, per-layer scales read from the checkpoint, the
pool sized at the FP8 bytes per token, and the errors at start-up.

Accuracy tolerance, and why. e4m3 keeps 3 mantissa bits: each stored K/V element is within 1/16
(relative) of its value, so attention scores and outputs move by a few percent and the logits a
little. Over 24 prompts of 1-332 tokens (a third share a 32-token prefix, so prefix hits read FP8
blocks; a 64-token budget chunks the long ones), 8 greedy tokens each, compared position by
position while both engines' sequences agree (up to and including the first differing token):
  - the logprobs of the tokens in both engines' top 20 differ by at most 0.15;
  - wherever the top-1 token differs, the reference's own top-1/top-2 margin is below 0.1 (a near
    tie, flipped by a change below the bound), and the top-1 agrees at >= 85% of the positions
    (random tiny models have many near ties in a 639-token vocabulary).
"""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from tandem import LLM, SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import KVConnector
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.config import fp8_kv_unsupported_reason

MAX_LOGPROB_DIFF = 0.15
MIN_TOP1_AGREEMENT = 0.85
NEAR_TIE = 0.1
NEW_TOKENS = 8


def mixed_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(32)]  # two full blocks: prefix-cache hits
    lens = [1, 2, 5, 9, 15, 16, 17, 31, 33, 47, 64, 80, 100, 129, 150, 200, 255, 300, 8, 24, 40, 70, 111, 180]
    return [(shared if i % 3 == 0 else []) + [rng.randrange(3, vocab) for _ in range(n)] for i, n in enumerate(lens)]


def generate(model_dir: str, prompts, **config):
    config.setdefault("dtype", "float32")
    llm = LLM(model_dir, num_kv_blocks=512, max_num_batched_tokens=64, max_num_seqs=8, **config)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20, detokenize=False)
    return llm, [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def compare(ref_outs, fp8_outs) -> dict:
    positions = agree = 0
    max_diff, tie_flips = 0.0, []
    for ref, fp8 in zip(ref_outs, fp8_outs):
        for j in range(NEW_TOKENS):
            ref_lp, fp8_lp = ref.logprobs[j], fp8.logprobs[j]
            positions += 1
            agree += ref.token_ids[j] == fp8.token_ids[j]
            shared = set(ref_lp) & set(fp8_lp)
            assert len(shared) >= 15, "the two top-20 sets hardly overlap"
            max_diff = max(max_diff, max(abs(ref_lp[t].logprob - fp8_lp[t].logprob) for t in shared))
            if ref.token_ids[j] != fp8.token_ids[j]:
                top2 = sorted((lp.logprob for lp in ref_lp.values()), reverse=True)[:2]
                tie_flips.append(top2[0] - top2[1])
                break  # the sequences differ from here on: later positions are not comparable
    return dict(positions=positions, top1_agreement=agree / positions, max_logprob_diff=max_diff,
                margins_where_top1_differs=tie_flips)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_kv_logits_within_tolerance_of_fp32_cache(llama_dir, device):
    """On the CPU the references; on a GPU the Triton kernels and CUDA graphs (float32 model, so
    the FP8 cache is the only difference)."""
    prompts = mixed_prompts(AutoConfig.from_pretrained(llama_dir).vocab_size)
    _, ref = generate(llama_dir, prompts, device=device)
    llm, fp8 = generate(llama_dir, prompts, device=device, kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert llm.engine.stats().prefix_cache_hits > 0  # FP8 blocks were hashed, cached and hit
    got = compare(ref, fp8)
    assert got["positions"] >= 24 * 2, got
    assert got["max_logprob_diff"] <= MAX_LOGPROB_DIFF, got
    assert got["top1_agreement"] >= MIN_TOP1_AGREEMENT, got
    assert all(m < NEAR_TIE for m in got["margins_where_top1_differs"]), got


def write_kv_scales(model_dir, scales: dict[str, float]) -> None:
    """Adds per-layer KV scale tensors to the checkpoint, as FP8-KV checkpoints carry them."""
    save_file({name: torch.tensor(v, dtype=torch.float32) for name, v in scales.items()},
              f"{model_dir}/kv_scales.safetensors")


@pytest.fixture
def scaled_model(tmp_path):
    from tandem.engine.make_model import make_model

    return str(make_model(tmp_path / "llama", "llama", seed=1))


def test_checkpoint_kv_scales_are_used_and_ignored_for_a_16_bit_cache(scaled_model):
    # vLLM's names and ModelOpt's, one layer each (the tiny model has 2).
    write_kv_scales(scaled_model, {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 2.0,
                                   "model.layers.1.self_attn.k_proj.k_scale": 0.25,
                                   "model.layers.1.self_attn.v_proj.v_scale": 4.0})
    prompts = mixed_prompts(AutoConfig.from_pretrained(scaled_model).vocab_size)[:8]
    llm, fp8 = generate(scaled_model, prompts, kv_cache_dtype="fp8")
    runner = llm.engine.runner
    assert runner.kv_scales.k == (0.5, 0.25) and runner.kv_scales.v == (2.0, 4.0)
    assert [(l.self_attn.k_scale, l.self_attn.v_scale) for l in runner.model.layers] == [(0.5, 2.0), (0.25, 4.0)]
    # Power-of-two scales only shift the exponent range: still within the tolerance.
    ref_llm, ref = generate(scaled_model, prompts)
    assert ref_llm.engine.runner.kv_cache.dtype == torch.float32  # a float32 cache loads and ignores them
    assert compare(ref, fp8)["max_logprob_diff"] <= MAX_LOGPROB_DIFF


def test_deprecated_single_kv_scale_sets_both(scaled_model):
    # (q_scale / prob_scale belong to FP8 attention, which is not run: dropped.)
    write_kv_scales(scaled_model, {"model.layers.0.self_attn.kv_scale": 0.5, "model.layers.1.self_attn.kv_scale": 2.0,
                                   "model.layers.0.self_attn.q_scale": 3.0, "model.layers.1.self_attn.prob_scale": 1.0})
    llm = LLM(scaled_model, num_kv_blocks=8, kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_scales.k == llm.engine.runner.kv_scales.v == (0.5, 2.0)


@pytest.mark.parametrize("scales, message", [
    ({"model.layers.0.self_attn.k_scale": 0.5}, "some layers but not"),
    ({"model.layers.0.self_attn.k_scale": -1.0}, "finite positive"),
    ({"model.layers.7.self_attn.k_scale": 1.0}, "has 2 layers"),
])
def test_bad_checkpoint_kv_scales_fail_at_start_up(scaled_model, scales, message):
    write_kv_scales(scaled_model, scales)
    with pytest.raises(ValueError, match=message):
        LLM(scaled_model, num_kv_blocks=8, kv_cache_dtype="fp8")


def test_per_head_kv_scales_are_rejected(scaled_model):
    save_file({"model.layers.0.self_attn.k_scale": torch.ones(2)}, f"{scaled_model}/kv_scales.safetensors")
    with pytest.raises(ValueError, match="per-tensor"):
        LLM(scaled_model, num_kv_blocks=8, kv_cache_dtype="fp8")


def test_pool_from_memory_holds_more_blocks_at_fp8(llama_dir):
    """Sized from the same memory, an FP8 pool holds element-size-ratio times the blocks (4x a
    float32 cache on the CPU, 2x a bf16 one on a GPU)."""
    f32 = LLM(llama_dir, dtype="float32", cpu_kv_cache_gb=0.01).engine.runner
    fp8 = LLM(llama_dir, dtype="float32", cpu_kv_cache_gb=0.01, kv_cache_dtype="fp8").engine.runner
    assert fp8.bytes_per_block * 4 == f32.bytes_per_block
    assert 4 * f32.num_kv_blocks <= fp8.num_kv_blocks < 4 * (f32.num_kv_blocks + 1)
    assert fp8.kv_cache.numel() * fp8.kv_cache.element_size() <= 0.01 * 1024**3


@pytest.mark.parametrize("bad", ["fp16", "int8", "fp8_e5m2", "FP8"])
def test_unknown_kv_cache_dtype_is_a_clear_error(llama_dir, bad):
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        EngineConfig(model=llama_dir, kv_cache_dtype=bad)


def test_fp8_needs_compute_capability_8_9():
    assert "compute capability >= 8.9" in fp8_kv_unsupported_reason((8, 0), "NVIDIA A100-SXM4-80GB")
    assert "7.5" in fp8_kv_unsupported_reason((7, 5), "Tesla T4")
    assert fp8_kv_unsupported_reason((8, 9), "NVIDIA L4") is None
    assert fp8_kv_unsupported_reason((9, 0), "NVIDIA H100 80GB HBM3") is None


@pytest.mark.gpu
def test_fp8_kv_on_this_gpu_starts_or_fails_clearly(llama_dir):
    cap = torch.cuda.get_device_capability()
    if fp8_kv_unsupported_reason(cap, "") is None:
        llm = LLM(llama_dir, device="cuda", num_kv_blocks=64, kv_cache_dtype="fp8")
        out = llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False))
        assert len(out[0].outputs[0].token_ids) == 8
    else:
        with pytest.raises(ValueError, match="FP8 support"):
            EngineConfig(model=llama_dir, device="cuda", kv_cache_dtype="fp8")


class ScalesSeen(KVConnector):
    """A connector that loads and saves nothing and keeps what the engine bound it with."""

    def bind(self, kv_cache, block_size, wakeup, kv_scales=()):
        self.dtype, self.kv_scales = kv_cache.dtype, list(kv_scales)


@pytest.mark.parametrize("kv_cache_dtype, expected", [("fp8", [0.5, 2.0, 0.25, 4.0]), ("auto", [])])
def test_the_kv_connector_is_bound_with_the_cache_scales(scaled_model, kv_cache_dtype, expected):
    """What kvtransfer announces and checks (workers/disagg.py hands these to KVSender/KVReceiver)."""
    write_kv_scales(scaled_model, {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 2.0,
                                   "model.layers.1.self_attn.k_scale": 0.25, "model.layers.1.self_attn.v_scale": 4.0})
    seen = ScalesSeen()
    LLMEngine(EngineConfig(model=scaled_model, num_kv_blocks=8, kv_cache_dtype=kv_cache_dtype), kv_connector=seen)
    assert seen.kv_scales == expected
    assert seen.dtype == (torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.float32)
