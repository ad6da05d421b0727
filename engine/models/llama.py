"""The Llama family as plain PyTorch: Llama 2/3.x, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3
(per-head q/k RMSNorm). Parameter names follow Hugging Face, except that q/k/v and gate/up are
stored fused (one matmul each); `load_weights` maps the checkpoint's names onto them.

Tokens of all sequences in a step are packed into one flat batch [T, hidden].

Under tensor parallelism (`tp`, an `engine.tensor_parallel.TensorParallelGroup`) each module
holds its rank's slice and sums partial outputs with one all-reduce (that module's docstring);
with `tp` None (one device) nothing is sliced and no collective runs.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.kernels import ops
from tandem.kernels.fp8 import FP8_DTYPE
from tandem.engine.fp8 import Fp8Linear, Fp8Scheme, fp8_linear_like, scale_leaf
from tandem.kernels.rope import build_cos_sin_cache
from tandem.engine.attention import ForwardContext, paged_attention
from tandem.engine.tensor_parallel import head_shard, split_evenly, vocab_shard

if TYPE_CHECKING:
    from tandem.engine.tensor_parallel import TensorParallelGroup

def take(tensor, part: tuple[int, slice] | None) -> torch.Tensor:
    """`part` of a checkpoint tensor: a torch.Tensor, or a safetensors slice (reads only `part`)."""
    if part is None:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[:]
    dim, rows = part
    return tensor[rows] if dim == 0 else tensor[:, rows]


def rank_of(tp) -> tuple[int, int]:
    return (tp.rank, tp.world_size) if tp is not None else (0, 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (with Llama-3 / linear / yarn scaling) as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x style config
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        dim = head_dim_of(config)
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    """Under tensor parallelism the rank's heads only (`engine.tensor_parallel.head_shard`):
    qkv_proj column-parallel, o_proj row-parallel, one all-reduce of o_proj's output."""

    def __init__(self, config, layer_idx: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        self.heads = head_shard(config.num_attention_heads, config.num_key_value_heads, *rank_of(tp))
        self.num_heads = len(self.heads.q_heads)
        self.num_kv_heads = len(self.heads.kv_heads)
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        # An FP8 KV cache's per-layer dequantization scales (engine/kv_quant.py); set by the runner.
        self.k_scale = self.v_scale = 1.0
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor, ctx: ForwardContext):
        qkv = ops.linear(x, self.qkv_proj)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rope(q, k, positions, cos_sin)
        # v stays a strided view of qkv: the KV write takes strided rows (one copy kernel less per layer).
        out = paged_attention(self.layer_idx, q, k, v, self.scale, ctx, self.k_scale, self.v_scale)
        out = ops.linear(out.reshape(-1, self.q_size), self.o_proj)
        return out if self.tp is None else self.tp.all_reduce(out)

    def checkpoint_slice(self, proj: str, shard: int | None) -> tuple[int, slice] | None:
        """The part of the checkpoint's `proj` tensor (`shard` of the fused qkv) this rank holds."""
        if self.tp is None or proj not in ("qkv_proj", "o_proj"):
            return None
        d = self.head_dim
        heads = self.heads.q_heads if proj == "o_proj" or shard == 0 else self.heads.kv_heads
        return (1 if proj == "o_proj" else 0), slice(heads.start * d, heads.stop * d)


class MLP(nn.Module):
    """Under tensor parallelism the rank's slice of the intermediate dimension: gate_up_proj
    column-parallel, down_proj row-parallel, one all-reduce of the output (unless
    `reduce_output` is False: a caller that adds it to other partial sums reduces once)."""

    def __init__(self, config, tp: TensorParallelGroup | None = None, reduce_output: bool = True) -> None:
        super().__init__()
        self.tp = tp if reduce_output else None
        self.inter = split_evenly(config.intermediate_size, *rank_of(tp), "intermediate_size")
        self.sliced = tp is not None
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * len(self.inter), bias=False)
        self.down_proj = nn.Linear(len(self.inter), config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.linear(ops.linear(x, self.gate_up_proj), self.down_proj, silu_mul_input=True)
        return out if self.tp is None else self.tp.all_reduce(out)

    def checkpoint_slice(self, proj: str, shard: int | None) -> tuple[int, slice] | None:
        if not self.sliced or proj not in ("gate_up_proj", "down_proj"):
            return None
        return (1 if proj == "down_proj" else 0), slice(self.inter.start, self.inter.stop)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds the rows of its vocab slice (`vocab_shard`); an id outside it looks up
    zeros, and one all-reduce sums the ranks' lookups."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab, rows = vocab_shard(vocab_size, tp.rank, tp.world_size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab.start
        inside = (local >= 0) & (local < len(self.vocab))
        x = nn.functional.embedding(torch.where(inside, local, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(~inside[:, None], 0))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, residual, cos_sin, ctx):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, cos_sin, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def check_sliding_window(config) -> None:
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if config.sliding_window < config.max_position_embeddings:
            raise ValueError("sliding-window attention is not supported yet "
                             f"(sliding_window={config.sliding_window})")


def embedding_and_head(config, tp: TensorParallelGroup | None) -> tuple[nn.Module, nn.Linear]:
    """The token embedding and lm_head: whole, or (tensor parallel) the rank's vocab slice."""
    if tp is None:
        return (nn.Embedding(config.vocab_size, config.hidden_size),
                nn.Linear(config.hidden_size, config.vocab_size, bias=False))
    embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
    return embed, nn.Linear(config.hidden_size, embed.weight.shape[0], bias=False)


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard index in the fused weight)
    fused_names = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    # Steps with prompt chunks may run as padded CUDA graphs (workers/cuda_graphs.CudaGraphMixed):
    # padded token rows carry garbage, which is harmless only while no layer mixes rows.
    mixed_step_graphs = True

    def __init__(self, config, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        check_sliding_window(config)
        self.config = config
        self.tp = tp
        self.embed_tokens, self.lm_head = embedding_and_head(config, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.cos_sin: torch.Tensor | None = None  # float32 rope table, built by build_rope_table()

    def build_rope_table(self, device: torch.device) -> None:
        inv_freq, scaling = rope_inv_freq(self.config)
        self.cos_sin = build_cos_sin_cache(inv_freq, self.config.max_position_embeddings, scaling).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns hidden states [T, hidden] (logits are computed only where needed)."""
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, self.cos_sin, ctx)
            if ctx.layer_done is not None:
                ctx.layer_done(i)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.lm_head)
        if self.tp is None:
            return logits
        return self.tp.all_gather_last_dim(logits)[:, : self.config.vocab_size]

    # Projections whose weight reads faster on an H100 stored column-major (the [out, in]
    # parameter as a transposed view of a contiguous [in, out] tensor): F.linear then hands
    # cuBLAS an NN problem, whose small-batch kernels read the weight at 2.4-3.0 TB/s instead
    # of 2.0-2.9 (bench/probes/gemv_probe.py, bench/results/probes/gemv_probe_h100.json); large-batch
    # (prefill) rates are within +-3%. qkv is left as it is: slower that way at batch 1.
    # Used only with TANDEM_SKINNY_GEMV=0: the batch-1 GEMV (kernels/gemv.py) reads row-major.
    column_major_suffixes = ("o_proj", "gate_up_proj", "down_proj", "lm_head")

    def use_column_major_weights(self) -> None:
        """Re-lay the `column_major_suffixes` weights in place (after loading; GPU only)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(self.column_major_suffixes):
                if name == "lm_head" and module.weight is self.embed_tokens.weight:
                    continue  # tied to the embedding, whose row gathers want row-major
                with torch.no_grad():
                    module.weight.data = module.weight.data.t().contiguous().t()

    # Linear layers never quantized: MoE routers (as in FP8 checkpoints, vLLM and transformers).
    unquantized = (".mlp.gate",)

    def quantize_fp8(self, scheme: Fp8Scheme) -> None:
        """Replace the decoder layers' linear layers by empty `Fp8Linear`s before loading (the LM
        head and MoE routers stay in the model dtype; modules the checkpoint keeps unquantized too)."""
        if self.tp is not None:  # FP8 scales would need the same slicing as their weights
            raise ValueError("FP8 weights with tensor parallelism are not supported yet (tensor_parallel_size > 1)")
        for name, module in list(self.named_modules()):
            if not isinstance(module, nn.Linear) or not name.startswith("layers.") or name.endswith(self.unquantized):
                continue
            if any(scheme.skips(hf) for hf in self.checkpoint_names(name)):
                if not all(scheme.skips(hf) for hf in self.checkpoint_names(name)):
                    raise ValueError(f"{name}: the checkpoint quantizes only some of {self.checkpoint_names(name)}")
                continue
            parent, leaf = name.rsplit(".", 1)
            setattr(self.get_submodule(parent), leaf, fp8_linear_like(module, scheme))

    def checkpoint_names(self, name: str) -> list[str]:
        """The checkpoint's module names (without "model.") that load into our module `name`."""
        for fused in {ours for ours, _ in self.fused_names.values()}:
            if name.endswith("." + fused):
                return [name.removesuffix(fused) + frag for frag, (ours, _) in self.fused_names.items()
                        if ours == fused]
        return [name]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            for ckpt_frag, (our_frag, shard) in self.fused_names.items():
                if f".{ckpt_frag}." in name:
                    target = name.replace(ckpt_frag, our_frag)
                    part = take(tensor, self._checkpoint_slice(target, shard))
                    loaded.update(self._load_tensor(params, target, part, our_frag, shard))
                    break
            else:
                if self.tp is not None and name in ("embed_tokens.weight", "lm_head.weight"):
                    part = take(tensor, self._checkpoint_slice(name, None))
                    with torch.no_grad():
                        params[name][len(part):].zero_()  # the padding rows of the last vocab slice
                        params[name][: len(part)].copy_(part)
                    loaded.add(name)
                    continue
                part = take(tensor, self._checkpoint_slice(name, None)) if name in params else tensor
                loaded.update(self._load_tensor(params, name, part, None, None))
        if self.tie_word_embeddings and "lm_head.weight" not in loaded:
            self.lm_head.weight = self.embed_tokens.weight
            loaded.add("lm_head.weight")
        self._check_complete(params, loaded)

    def _checkpoint_slice(self, name: str, shard: int | None) -> tuple[int, slice] | None:
        """The part of checkpoint tensor `name` (our parameter name; `shard` of a fused one) this
        rank holds under tensor parallelism; None: all of it."""
        if self.tp is None:
            return None
        if name in ("embed_tokens.weight", "lm_head.weight"):
            vocab, _ = vocab_shard(self.config.vocab_size, self.tp.rank, self.tp.world_size)
            return 0, slice(vocab.start, vocab.stop)
        parts = name.rsplit(".", 2)
        if len(parts) == 3:
            owner = self.get_submodule(parts[0])
            if hasattr(owner, "checkpoint_slice"):
                return owner.checkpoint_slice(parts[1], shard)
        return None  # replicated: norms, routers

    def _load_tensor(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                     fused: str | None, shard: int | None) -> list[str]:
        """Copies one checkpoint tensor (a fused layer's shard when `fused`); returns the names
        it filled (`name#shard` for shards)."""
        prefix, _, leaf = name.rpartition(".")
        try:
            module = self.get_submodule(prefix) if prefix else None
        except AttributeError:
            module = None  # not one of ours: reported below
        suffix = "" if shard is None else f"#{shard}"
        if isinstance(module, Fp8Linear):
            leaf = scale_leaf(leaf) or leaf
            rows = slice(None) if fused is None else self._shard_rows(module.weight, fused, shard)
            return [f"{prefix}.{p}{suffix}" for p in module.load(leaf, tensor, rows, name)]
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        if tensor.dtype == FP8_DTYPE:
            raise ValueError(f"{name}: the checkpoint stores it in FP8, Tandem keeps this layer in "
                             f"{params[name].dtype} (a quantization_config is missing or lists it as quantized)")
        target = params[name] if fused is None else params[name][self._shard_rows(params[name], fused, shard)]
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        return [name + suffix]

    def _shard_rows(self, param: torch.Tensor, fused: str, shard: int) -> slice:
        if fused == "qkv_proj":
            attn = self.layers[0].self_attn
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [len(self.layers[0].mlp.inter)] * 2
        start = sum(sizes[:shard])
        return slice(start, start + sizes[shard])

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name in loaded:
                continue
            frag = next((f for f in ("qkv_proj", "gate_up_proj") if f in name), None)
            n_shards = {"qkv_proj": 3, "gate_up_proj": 2}.get(frag, 0)
            if frag and all(f"{name}#{i}" in loaded for i in range(n_shards)):
                continue
            missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing weights (or their FP8 scales): {missing[:8]}")
