"""FP8 weights end to end on the CPU: the FP8 checkpoints users have (transformers' block-wise
layout as `tandem make-model --quantization fp8` writes it, AutoFP8's per-tensor static layout,
compressed-tensors' per-channel one), load-time quantization of a float32 checkpoint, its
accuracy against the float32 model, and the start-up errors for what is not supported."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem import LLM, SamplingParams
from tandem.engine.fp8 import Fp8Linear, set_quantize_input
from tandem.engine.make_model import ARCHITECTURES, MOE_ARCHITECTURES, make_model
from tandem.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_weight, quantize_rows
from tests.engine.hf_oracle import hf_greedy
from tests.engine.model_logits import prefill_logits

# The 24 prompt lengths of the HF parity tests: one token to several blocks, block edges included.
PROMPT_LENS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 47, 64, 100, 127, 128, 129, 200, 255, 256, 300, 333, 384, 420,
               480, 500]
DENSE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prompts_for(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lens]


def greedy(llm: LLM, prompts, max_tokens: int = 8) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].token_ids for o in outs]


def rewrite_checkpoint(src: str, dst: Path, quantization_config: dict | None, convert) -> Path:
    """A copy of model folder `src` whose weights are `convert(state) -> state` and whose config.json
    carries `quantization_config` (none when None)."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(convert(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def dense_linear_names(state) -> list[str]:
    return [n for n in state if n.startswith("model.layers.") and n.rsplit(".", 2)[-2] in DENSE_LINEARS
            and n.endswith(".weight")]


# ------------------------------------------------------------------ accuracy (Must show)

# FP8 weights (per-channel e4m3) against the float32 model, logits at every position of 24
# prompts of mixed lengths (3821 positions), load-time quantization. Tolerances, with margin over
# what these seeded tiny models give (bench/results/README.md has the measured figures):
#  - top-1 agreement >= 0.85 over all positions: random tiny models have flat distributions, so
#    many positions are near-ties that any perturbation flips;
#  - agreement 1.0 where the float32 model's top-1 leads its runner-up by > 0.25 nats (12-55% of
#    the positions, by architecture);
#  - |logprob difference| of the float32 model's top-1 token <= 0.25 (dense), <= 0.5 (MoE: a token
#    whose router scores nearly tie can switch experts).
# Both with the CPU path's activations in float32 and rounded through e4m3 per token as the
# GPU's FP8 GEMM rounds them (`set_quantize_input`).
def decisive_positions(logprobs: torch.Tensor) -> torch.Tensor:
    """Where the top-1 token leads its runner-up by more than 0.25 nats."""
    best_two = logprobs.topk(2, dim=-1).values
    return best_two[:, 0] - best_two[:, 1] > 0.25


def assert_fp8_accuracy(got_logits: torch.Tensor, float32_logprobs: torch.Tensor, arch: str, what) -> None:
    """FP8 logits against the float32 model's log-probabilities, by the tolerances above."""
    top = float32_logprobs.argmax(dim=-1)
    got = torch.log_softmax(got_logits, dim=-1)
    agree = got.argmax(dim=-1) == top
    diff = (got.gather(1, top[:, None]) - float32_logprobs.gather(1, top[:, None])).abs().max().item()
    assert agree.float().mean() >= 0.85, (what, agree.float().mean())
    assert agree[decisive_positions(float32_logprobs)].all(), what
    assert diff <= (0.5 if arch in MOE_ARCHITECTURES else 0.25), (what, diff)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp8_logits_within_tolerance_of_float32(model_dirs, arch):
    ref = LLM(model_dirs[arch], num_kv_blocks=8).engine.runner.model
    fp8 = LLM(model_dirs[arch], num_kv_blocks=8, quantization="fp8").engine.runner.model
    assert isinstance(fp8.layers[0].self_attn.qkv_proj, Fp8Linear)
    assert fp8.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    prompts = prompts_for(ref.config.vocab_size)
    expected = torch.log_softmax(prefill_logits(ref, prompts, every_position=True), dim=-1)
    assert decisive_positions(expected).sum() > 400
    for quantize_input in (False, True):
        set_quantize_input(fp8, quantize_input)
        assert_fp8_accuracy(prefill_logits(fp8, prompts, every_position=True), expected, arch,
                            f"quantize_input={quantize_input}")


def test_load_time_quantization_is_per_channel(model_dirs):
    """Each row of a projection gets its own scale: the row's largest |w| maps to 448."""
    model = LLM(model_dirs["qwen2"], num_kv_blocks=8, quantization="fp8").engine.runner.model
    state = load_file(str(Path(model_dirs["qwen2"]) / "model.safetensors"))
    k_proj = state["model.layers.1.self_attn.k_proj.weight"]
    layer = model.layers[1].self_attn
    q, scale = quantize_rows(k_proj)
    rows = slice(layer.q_size, layer.q_size + layer.kv_size)
    assert torch.equal(layer.qkv_proj.weight[rows].float(), q.float())
    assert torch.equal(layer.qkv_proj.weight_scale[rows], scale)
    assert layer.qkv_proj.bias is not None  # qwen2's q/k/v bias stays in the model dtype
    assert model.lm_head.weight.dtype == torch.float32


# ------------------------------------------------------------------ checkpoints users have

@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp8_models")
    return {arch: str(make_model(root / arch, arch, seed=1, quantization="fp8")) for arch in ARCHITECTURES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="transformers dequantizes FP8 checkpoints only without a GPU")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_make_model_fp8_checkpoint_matches_hf_loading_it(fp8_dirs, arch):
    """transformers loads the same FP8 folder (on a CPU it dequantizes the weights); our
    reference path (dequantize, then matmul in float32) gives its greedy tokens exactly."""
    config = json.loads((Path(fp8_dirs[arch]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    llm = LLM(fp8_dirs[arch], num_kv_blocks=64)
    model = llm.engine.runner.model
    assert isinstance(model.layers[0].self_attn.o_proj, Fp8Linear)
    assert model.layers[0].self_attn.o_proj.weight.dtype == FP8_DTYPE
    if arch in MOE_ARCHITECTURES:
        experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
        assert experts.gate_up_proj.dtype == FP8_DTYPE and experts.fp8_scales() is not None
    prompts = prompts_for(model.config.vocab_size, lens=[3, 17, 64, 130])
    assert greedy(llm, prompts) == [hf_greedy(fp8_dirs[arch], p, 8) for p in prompts]


def test_per_tensor_static_checkpoint_computes_its_dequantized_model(model_dirs, tmp_path):
    """AutoFP8 / vLLM's layout: one `weight_scale` per tensor and a static `input_scale`; fused
    q/k/v and gate/up keep each shard's own scale. On the CPU the reference path is exactly the
    float32 model whose weights are the dequantized FP8 ones."""
    src = model_dirs["llama"]
    dequantized: dict[str, torch.Tensor] = {}

    def per_tensor(state):
        out = dict(state)
        for name in dense_linear_names(state):
            w = state[name]
            scale = w.abs().max() / FP8_MAX * (1 + 0.5 * random.Random(name).random())  # shards differ
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[name], out[name.replace(".weight", ".weight_scale")] = q, scale.reshape(())
            out[name.replace(".weight", ".input_scale")] = torch.tensor(0.02)
            dequantized[name] = q.float() * scale
        return out

    fp8_dir = rewrite_checkpoint(src, tmp_path / "fp8", {"quant_method": "fp8", "activation_scheme": "static"},
                                 per_tensor)
    plain_dir = rewrite_checkpoint(src, tmp_path / "plain", None, lambda state: {**state, **dequantized})
    fp8, plain = LLM(str(fp8_dir), num_kv_blocks=64), LLM(str(plain_dir), num_kv_blocks=64)
    qkv = fp8.engine.runner.model.layers[0].self_attn.qkv_proj
    assert qkv.input_scale is not None and qkv.input_scale.item() == pytest.approx(0.02)
    assert len(set(qkv.weight_scale[:, 0].tolist())) == 3  # q, k and v scales, each over its rows
    prompts = prompts_for(fp8.engine.runner.model.config.vocab_size, lens=[1, 9, 40, 77])
    assert torch.equal(prefill_logits(fp8.engine.runner.model, prompts),
                       prefill_logits(plain.engine.runner.model, prompts))
    assert greedy(fp8, prompts) == greedy(plain, prompts)


def test_compressed_tensors_per_channel_checkpoint(model_dirs, tmp_path):
    """compressed-tensors' float-quantized layout: `weight_scale` [N, 1], dynamic token activations,
    `ignore: [lm_head]`."""
    src = model_dirs["qwen3"]
    dequantized: dict[str, torch.Tensor] = {}

    kept = "model.layers.1.mlp.down_proj.weight"  # in the skip list: stays float32

    def per_channel(state):
        out = dict(state)
        for name in dense_linear_names(state):
            if name == kept:
                continue
            q, scale = quantize_rows(state[name])
            out[name], out[name.replace(".weight", ".weight_scale")] = q, scale
            dequantized[name] = dequantize_weight(q, scale, q.shape[1])
        return out

    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "ignore": ["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"],
          "config_groups": {"group_0": {
              "targets": ["Linear"],
              "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
              "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}}}
    fp8 = LLM(str(rewrite_checkpoint(src, tmp_path / "ct", qc, per_channel)), num_kv_blocks=64)
    plain = LLM(str(rewrite_checkpoint(src, tmp_path / "plain", None, lambda s: {**s, **dequantized})),
                num_kv_blocks=64)
    assert fp8.engine.runner.model.layers[0].mlp.down_proj.input_scale is None
    assert type(fp8.engine.runner.model.layers[1].mlp.down_proj) is torch.nn.Linear
    prompts = prompts_for(fp8.engine.runner.model.config.vocab_size, lens=[2, 33, 90])
    assert torch.equal(prefill_logits(fp8.engine.runner.model, prompts),
                       prefill_logits(plain.engine.runner.model, prompts))


# ------------------------------------------------------------------ bad input, refused at start-up

def _with_config(src: str, dst: Path, qc: dict) -> str:
    return str(rewrite_checkpoint(src, dst, qc, lambda state: state))


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4}, "unsupported quantization_config.quant_method 'awq'"),
    ({"quant_method": "fp8", "activation_scheme": "per_group"}, "activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "scale_fmt": "ue8m0"}, "scale_fmt"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {}}},
     "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}}, "weight scheme"),
])
def test_unsupported_quantization_configs_are_refused(fp8_dirs, tmp_path, qc, match):
    with pytest.raises(ValueError, match=match):
        LLM(_with_config(fp8_dirs["llama"], tmp_path / "m", qc), num_kv_blocks=8)


def test_a_fused_layer_quantized_in_part_is_refused(fp8_dirs, tmp_path):
    src = fp8_dirs["llama"]
    config = json.loads((Path(src) / "config.json").read_text())["quantization_config"]
    config["modules_to_not_convert"] = config["modules_to_not_convert"] + ["model.layers.0.self_attn.k_proj"]
    with pytest.raises(ValueError, match="quantizes only some of"):
        LLM(_with_config(src, tmp_path / "m", config), num_kv_blocks=8)


def test_unknown_quantization_setting_is_refused(model_dirs):
    with pytest.raises(ValueError, match="unsupported quantization 'int4'"):
        LLM(model_dirs["llama"], quantization="int4")


def test_checkpoint_missing_scales_is_refused(fp8_dirs, tmp_path):
    def drop_one_scale(state):
        return {n: t for n, t in state.items() if n != "model.layers.1.self_attn.k_proj.weight_scale_inv"}

    src = fp8_dirs["llama"]
    config = json.loads((Path(src) / "config.json").read_text())["quantization_config"]
    broken = rewrite_checkpoint(src, tmp_path / "m", config, drop_one_scale)
    with pytest.raises(ValueError, match=r"missing weights \(or their FP8 scales\).*layers\.1\.self_attn\.qkv_proj\.weight_scale"):
        LLM(str(broken), num_kv_blocks=8)


def test_fp8_weights_without_a_quantization_config_are_refused(fp8_dirs, tmp_path):
    src = fp8_dirs["qwen3_moe"]
    with pytest.raises(ValueError, match="FP8"):
        LLM(str(rewrite_checkpoint(src, tmp_path / "m", None, lambda s: s)), num_kv_blocks=8)


def test_high_precision_layer_in_an_fp8_checkpoint_is_refused(fp8_dirs, model_dirs, tmp_path):
    """A layer the config says is FP8 but the checkpoint stores in float32 (not in the skip list)."""
    plain = load_file(str(Path(model_dirs["llama"]) / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"

    def unquantize_one(state):
        out = {n: t for n, t in state.items() if n != name.replace(".weight", ".weight_scale_inv")}
        out[name] = plain[name]
        return out

    src = fp8_dirs["llama"]
    config = json.loads((Path(src) / "config.json").read_text())["quantization_config"]
    with pytest.raises(ValueError, match="stores this layer as torch.float32"):
        LLM(str(rewrite_checkpoint(src, tmp_path / "m", config, unquantize_one)), num_kv_blocks=8)


# ------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3_moe"])
def test_fp8_on_gpu_computes_the_reference_function(model_dirs, arch):
    """The GPU's paths (`torch._scaled_mm` with per-token activation scales, the FP8 GEMV at one
    row, the FP8 fused MoE) against the CPU reference that rounds as each of them does (e4m3
    activations and a bf16 output where `_scaled_mm` runs), float32 model dtype on both.
    `_scaled_mm` itself is not exact: a few per cent of its outputs differ from the exactly
    rounded product of the same e4m3 operands (its accumulation), and each later layer's e4m3
    rounding of its input amplifies that. So where it runs, the GPU is held to a fraction of
    FP8's own error against float32, and to the accuracy the CPU path is held to."""
    gpu = LLM(model_dirs[arch], device="cuda", dtype="float32", num_kv_blocks=64, quantization="fp8").engine.runner.model
    cpu = LLM(model_dirs[arch], num_kv_blocks=64, quantization="fp8").engine.runner.model
    ref = LLM(model_dirs[arch], num_kv_blocks=64).engine.runner.model
    prompts = prompts_for(cpu.config.vocab_size, lens=[1, 7, 64, 129])
    # A one-token prompt: projections without a bias through the GEMV (unquantized activations,
    # exact up to accumulation order), those with one (Qwen2's q/k/v) through `_scaled_mm`.
    for module in cpu.modules():
        if isinstance(module, Fp8Linear):
            module.quantize_input = module.bias is not None
    one_row, expected = prefill_logits(gpu, [prompts[0]]), prefill_logits(cpu, [prompts[0]])
    one_row_error = ((one_row - expected).norm() / expected.norm()).item()
    set_quantize_input(cpu, True)
    got, expected = prefill_logits(gpu, prompts, every_position=True), prefill_logits(cpu, prompts, every_position=True)
    full = prefill_logits(ref, prompts, every_position=True)
    batch_error = ((got - expected).norm() / expected.norm()).item()
    fp8_error = ((expected - full).norm() / full.norm()).item()
    print(f"\n{arch}: relative logit error vs the CPU reference: one row {one_row_error:.2e}, batch {batch_error:.2e} "
          f"(the reference vs float32: {fp8_error:.2e})")
    assert one_row_error < (2e-3 if arch == "qwen2" else 1e-5)
    assert batch_error < 0.6 * fp8_error
    # and as accurate against float32 as the CPU path must be (test_fp8_logits_within_tolerance_of_float32)
    assert_fp8_accuracy(got, torch.log_softmax(full, dim=-1), arch, "GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_fp8_on_gpu_graphs_give_the_eager_tokens(fp8_dirs, arch):
    """The FP8 checkpoint make-model writes, on the GPU in bf16, batch-1 decode steps replayed from
    CUDA graphs (the FP8 GEMV): the same greedy tokens as eager steps. One prompt at a time, so both
    run the same kernels on the same rows; then a batch runs too (`torch._scaled_mm`)."""
    with_graphs = LLM(fp8_dirs[arch], device="cuda", num_kv_blocks=64)
    eager = LLM(fp8_dirs[arch], device="cuda", num_kv_blocks=64, enforce_eager=True)
    prompts = prompts_for(with_graphs.engine.runner.model.config.vocab_size, lens=[5, 40, 100])
    for p in prompts:
        assert greedy(with_graphs, [p], 16) == greedy(eager, [p], 16)
    assert [len(t) for t in greedy(with_graphs, prompts, 16)] == [16, 16, 16]


@pytest.mark.gpu
def test_load_time_fp8_on_gpu_halves_the_linear_weights(model_dirs):
    bf16 = LLM(model_dirs["llama"], device="cuda", num_kv_blocks=64).engine.runner.model
    fp8 = LLM(model_dirs["llama"], device="cuda", num_kv_blocks=64, quantization="fp8").engine.runner.model
    qkv_bf16, qkv_fp8 = bf16.layers[0].self_attn.qkv_proj.weight, fp8.layers[0].self_attn.qkv_proj.weight
    assert qkv_fp8.dtype == FP8_DTYPE and qkv_fp8.nbytes * 2 == qkv_bf16.nbytes
    prompts = prompts_for(bf16.config.vocab_size, lens=[3, 50])
    assert all(len(t) == 8 for t in greedy(LLM(model_dirs["llama"], device="cuda", num_kv_blocks=64,
                                               quantization="fp8"), prompts))


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_fp8_layers_take_the_triton_kernels_in_the_model(model_dirs, arch, monkeypatch):
    """The kernel seams with FP8 weights: TANDEM_TRITON_ON_CPU=1 sends an MoE layer (attention's
    FP8 projections, the FP8 experts, qwen2_moe's FP8 shared expert) through the Triton kernels in
    the interpreter: the FP8 GEMM at several rows, the FP8 GEMV at one; the outputs equal the
    reference path's."""
    layer = LLM(model_dirs[arch], num_kv_blocks=8, quantization="fp8").engine.runner.model.layers[0]
    assert layer.mlp.experts.fp8_scales() is not None
    for rows in (13, 1):
        x = torch.randn(rows, layer.mlp.gate.in_features)
        with torch.inference_mode():
            monkeypatch.delenv("TANDEM_TRITON_ON_CPU", raising=False)
            ref_mlp, ref_o = layer.mlp(x), layer.self_attn.o_proj(x)
            monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
            out_mlp, out_o = layer.mlp(x), layer.self_attn.o_proj(x)
        torch.testing.assert_close(out_mlp, ref_mlp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_o, ref_o, rtol=1e-5, atol=1e-6)
