"""`tandem make-model`: write a small random-weight Hugging Face model folder (config.json,
model.safetensors, tokenizer files with a chat template) for tests, demos and benchmarks.

No model hub is reachable from our machines, so the project makes its own models: the
tokenizer is a byte-level BPE trained on an embedded corpus (any text encodes), the weights
come from transformers' own initialisation of the architecture, seeded.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral", "qwen2_moe")
ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = """
Tandem serves large language models with prefill and decode split across GPU pools.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A paged KV cache stores keys and values in fixed-size blocks; a block table maps each
sequence's logical blocks to physical ones. Continuous batching re-forms the batch every step.
Chunked prefill splits long prompts so decodes keep flowing. Prefix caching reuses the blocks
of a shared system prompt. The router keeps each conversation on the replica that holds its
cached prefix, and balances load between replicas. Hello world! How are you today? I am fine,
thank you. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828. Unicode: café, naïve,
Straße, 東京, Привет, مرحبا, emoji 🙂🚀. def main(): return 42  # code too.
"""

# Tiny shapes: fast on a CPU, but every feature of the architecture is exercised (GQA, rope
# scaling on llama, qkv bias on qwen2, q/k norm on qwen3, tied embeddings on the qwens).
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
_SIZES = {
    "tiny": _TINY,
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, max_position_embeddings=4096),
}
# Expert shapes for the MoE architectures, on top of the size's attention shape. Tiny MoE models
# get a third layer so qwen3_moe can keep one dense layer (mlp_only_layers) between sparse ones.
_MOE = {
    "tiny": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hidden_layers=3),
    "small": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128),
}


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on the embedded corpus, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
        pad_token="<|pad|>", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, size: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {tuple(_SIZES)}")
    shape = dict(_SIZES[size])
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  rms_norm_eps=1e-6, initializer_range=0.05, **shape)
    if arch == "llama":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 256},
        )
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if arch in MOE_ARCHITECTURES:
        return _moe_config(arch, common, _MOE[size])
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return transformers.Qwen3Config(**common, tie_word_embeddings=True, use_sliding_window=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def _moe_config(arch: str, common: dict, moe: dict):
    import transformers

    common = {**common, "num_hidden_layers": moe.get("num_hidden_layers", common["num_hidden_layers"])}
    rope = {"rope_type": "default", "rope_theta": 1e6}
    if arch == "mixtral":  # Mixtral's experts use intermediate_size; renormalised top-2 routing
        return transformers.MixtralConfig(
            **{**common, "intermediate_size": moe["moe_intermediate_size"]}, sliding_window=None,
            num_local_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
            tie_word_embeddings=False, rope_parameters=rope)
    experts = dict(num_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
                   moe_intermediate_size=moe["moe_intermediate_size"], decoder_sparse_step=1)
    if arch == "qwen3_moe":  # as Qwen3-30B-A3B: top-k renormalised; layer 1 kept dense here
        return transformers.Qwen3MoeConfig(**common, **experts, norm_topk_prob=True, mlp_only_layers=[1],
                                           tie_word_embeddings=True, use_sliding_window=False,
                                           rope_parameters=rope)
    # qwen2_moe: raw top-k softmax weights plus a sigmoid-gated shared expert, qkv bias
    return transformers.Qwen2MoeConfig(**common, **experts, norm_topk_prob=False, mlp_only_layers=[],
                                       shared_expert_intermediate_size=2 * moe["moe_intermediate_size"],
                                       qkv_bias=True, tie_word_embeddings=False, use_sliding_window=False,
                                       rope_parameters=rope)


def make_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, size: str = "tiny",
               quantization: str | None = None) -> Path:
    """Write a random-weight model folder and return its path. `quantization="fp8"` writes the
    same model's weights as an FP8 checkpoint (`write_fp8_checkpoint`)."""
    if quantization not in (None, "fp8"):
        raise ValueError(f"unsupported quantization {quantization!r}; supported: fp8")
    import torch
    import transformers

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = build_config(arch, size, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if quantization == "fp8":
        write_fp8_checkpoint(model, out)
    meta = {"arch": arch, "size": size, "seed": seed, **({"quantization": quantization} if quantization else {})}
    (out / "tandem_model.json").write_text(json.dumps(meta) + "\n")
    return out


FP8_BLOCK = (128, 128)


def _expert_names(config) -> dict[str, str]:
    if config.model_type == "mixtral":
        return {"gate": "w1", "up": "w3", "down": "w2"}
    return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def write_fp8_checkpoint(model, out: Path) -> None:
    """Rewrite `out`'s weights as the FP8 checkpoint transformers' FineGrainedFP8 and vLLM's Fp8Config
    both load (as DeepSeek-V3 and Qwen3-FP8 ship): every decoder linear layer and stacked expert
    weight e4m3 with a float32 `weight_scale_inv` per 128 x 128 block, activations dynamic; the
    LM head, embeddings, norms and MoE routers stay float32 (`modules_to_not_convert`)."""
    import torch
    from safetensors.torch import save_file

    from tandem.kernels.fp8 import quantize_blocks

    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    linears = {name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
               and not name.endswith(".gate")}
    keep = sorted({"lm_head"} | {name for name, _ in model.named_modules() if name.endswith((".mlp.gate",))})
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and module in linears:
            quantized[name], quantized[f"{module}.weight_scale_inv"] = quantize_blocks(tensor, FP8_BLOCK)
        elif module.endswith(".experts") and leaf in ("gate_up_proj", "down_proj") and tensor.dim() == 3:
            # Per expert, as FP8 MoE checkpoints ship (transformers stacks them while loading).
            for expert, w in enumerate(tensor):
                halves = zip(("gate", "up"), w.chunk(2, dim=0)) if leaf == "gate_up_proj" else [("down", w)]
                for kind, part in halves:
                    prefix = f"{module}.{expert}.{_expert_names(model.config)[kind]}"
                    quantized[f"{prefix}.weight"], quantized[f"{prefix}.weight_scale_inv"] = \
                        quantize_blocks(part.contiguous(), FP8_BLOCK)
        else:
            quantized[name] = tensor
    for path in out.glob("*.safetensors*"):
        path.unlink()
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": keep}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama", help="the model's architecture")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--size", choices=tuple(_SIZES), default="tiny", help="the model's shapes")
    parser.add_argument("--quantization", choices=("fp8",), default=None,
                        help="fp8: write the weights as an FP8 checkpoint (e4m3, 128x128 block scales, the "
                             "layout transformers and vLLM load); default: none, float32 weights")


def run(args: argparse.Namespace) -> int:
    path = make_model(args.out_dir, args.arch, args.seed, args.size, args.quantization)
    kind = f"{args.quantization} " if args.quantization else ""
    print(f"wrote a random {args.size} {kind}{args.arch} model to {path}")
    return 0


DEFAULT_MODEL_DIR = Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem")) / "tiny-llama"


def default_model() -> str:
    """The embedded default model (`tandem generate`, `tandem serve` with no --model): made once."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        make_model(DEFAULT_MODEL_DIR, "llama", seed=0)
    return str(DEFAULT_MODEL_DIR)
