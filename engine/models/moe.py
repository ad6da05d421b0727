"""Mixture-of-experts decoders as plain PyTorch: Qwen3-MoE, Qwen2-MoE and Mixtral. Attention,
norms, rope and the dense MLP are llama.py's; what differs is the sparse MLP block:

    router logits = gate(x); p = softmax(logits) in float32; top-k of p
    (renormalised over the k for Mixtral and where config.norm_topk_prob)
    out = sum_j p_j * expert_j(x)              (+ sigmoid(shared_gate(x)) * shared_expert(x), Qwen2-MoE)

Experts are stored stacked, as transformers v5 holds them: `mlp.experts.gate_up_proj`
[E, 2I, H] and `mlp.experts.down_proj` [E, H, I]. Checkpoints come either that way or per
expert (`experts.N.{gate,up,down}_proj`, Mixtral's `block_sparse_moe.experts.N.w1/w3/w2`); both
load. Under expert parallelism the model holds only its rank's slice of the experts. Under
tensor parallelism attention is llama.py's (heads split), and every rank holds every expert
sliced along the intermediate dimension (as the dense MLP is): its partial expert outputs, and
the shared expert's, are summed by one all-reduce per MoE layer; the router is replicated.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn

from tandem.kernels import fused_moe as fused_moe_mod
from tandem.kernels.fp8 import FP8_DTYPE
from tandem.kernels.fused_moe import MoeFp8Scales
from tandem.engine.fp8 import Fp8Scheme, expand_weight_scale, load_fp8_rows, scale_leaf
from tandem.engine.models.llama import (MLP, Attention, DecoderLayer, LlamaForCausalLM, RMSNorm,
                                        check_sliding_window, embedding_and_head, rank_of, take)
from tandem.engine.tensor_parallel import split_evenly

if TYPE_CHECKING:
    from tandem.engine.expert_parallel import ExpertParallelGroup
    from tandem.engine.tensor_parallel import TensorParallelGroup


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, scales=None) -> torch.Tensor:
    """Triton on CUDA (or on CPU under TANDEM_TRITON_ON_CPU=1), the torch reference elsewhere."""
    if x.is_cuda or os.environ.get("TANDEM_TRITON_ON_CPU") == "1":
        return fused_moe_mod.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, scales=scales)
    return fused_moe_mod.fused_moe_ref(x, w_gate_up, w_down, topk_weights, topk_ids, scales=scales)


def num_experts_of(config) -> int:
    """Qwen configs say num_experts, Mixtral's num_local_experts."""
    if getattr(config, "num_experts", None) is not None:
        return config.num_experts
    return config.num_local_experts


def expert_intermediate_size(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def is_sparse_layer(config, layer_idx: int) -> bool:
    if config.model_type == "mixtral":
        return True
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and num_experts_of(config) > 0 and (layer_idx + 1) % step == 0)


def dense_mlp(hidden_size: int, intermediate_size: int, tp: TensorParallelGroup | None = None,
              reduce_output: bool = True) -> MLP:
    return MLP(SimpleNamespace(hidden_size=hidden_size, intermediate_size=intermediate_size), tp, reduce_output)


@dataclass(frozen=True)
class ExpertLoadStats:
    """Tokens this rank routed to each expert (global ids), per MoE layer. Summing the stats of
    all ranks of a group gives the whole group's load; hot experts are the large entries."""

    moe_layers: list[int]  # model layer index of each row below
    last_step: list[list[int]]  # [moe layer][expert]: tokens in the most recent forward pass
    cumulative: list[list[int]]  # [moe layer][expert]: since start (or the last reset)
    num_steps: int

    def total_per_expert(self) -> list[int]:
        return [sum(col) for col in zip(*self.cumulative)] if self.cumulative else []

    def hot_experts(self, n: int = 8) -> list[tuple[int, int, int]]:
        """The n busiest (layer, expert, tokens) entries, cumulative."""
        entries = [(layer, e, count) for layer, row in zip(self.moe_layers, self.cumulative)
                   for e, count in enumerate(row)]
        return sorted(entries, key=lambda entry: -entry[2])[:n]


class ExpertLoadRecorder(nn.Module):
    """Counts on the device, updated inside the forward pass without a host sync (so a captured
    CUDA graph keeps counting); read back only by `snapshot()`. `paused` (set around expert
    parallelism's idle padding forwards) keeps non-requests out of the counts."""

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__()
        self.paused = False
        self.moe_layers = list(moe_layers)
        self.row_of_layer = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.register_buffer("last_step", torch.zeros(len(moe_layers), num_experts, dtype=torch.long),
                             persistent=False)
        self.register_buffer("cumulative", torch.zeros(len(moe_layers), num_experts, dtype=torch.long),
                             persistent=False)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long), persistent=False)

    def begin_step(self) -> None:
        if self.paused:
            return
        self.last_step.zero_()
        self.num_steps += 1

    def record(self, layer_idx: int, topk_ids: torch.Tensor) -> None:
        if self.paused:
            return
        row = self.row_of_layer[layer_idx]
        flat = topk_ids.reshape(-1).long()
        self.last_step[row].scatter_add_(0, flat, torch.ones_like(flat))
        self.cumulative[row].scatter_add_(0, flat, torch.ones_like(flat))

    def reset(self) -> None:
        self.last_step.zero_()
        self.cumulative.zero_()
        self.num_steps.zero_()

    def snapshot(self) -> ExpertLoadStats:
        return ExpertLoadStats(self.moe_layers, self.last_step.tolist(), self.cumulative.tolist(),
                               int(self.num_steps))


class Experts(nn.Module):
    """The experts of one layer held here, stacked; `first` is the global id of row 0; `inter`
    the slice of each expert's intermediate dimension held (all of it unless tensor parallel).
    With FP8 (`quantize_fp8`), the weights are e4m3 with float32 scales per expert and row
    (`gate_up_proj_scale` [E, 2I, G], `down_proj_scale` [E, H, G]; kernels/fp8.py's layout)."""

    def __init__(self, num_local: int, first: int, hidden_size: int, inter: range) -> None:
        super().__init__()
        self.first = first
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * len(inter), hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden_size, len(inter)))
        self.scheme: Fp8Scheme | None = None

    def quantize_fp8(self, scheme: Fp8Scheme) -> None:
        """Replace the weights by empty e4m3 ones and their scales, for the loader to fill."""
        self.scheme = scheme
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(self, name)
            num, rows, cols = old.shape
            setattr(self, name, nn.Parameter(torch.empty(old.shape, dtype=FP8_DTYPE, device=old.device),
                                             requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(
                torch.ones(num, rows, scheme.num_groups(cols), dtype=torch.float32, device=old.device),
                requires_grad=False))

    def fp8_scales(self) -> MoeFp8Scales | None:
        if self.scheme is None:
            return None
        return MoeFp8Scales(self.gate_up_proj_scale, self.down_proj_scale,
                            self.scheme.group_k(self.gate_up_proj.shape[2]), self.scheme.group_k(self.down_proj.shape[2]))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, local_ids, scales=self.fp8_scales())


class SparseMoeBlock(nn.Module):
    def __init__(self, config, layer_idx: int, ep: ExpertParallelGroup | None,
                 load: ExpertLoadRecorder, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = num_experts_of(config)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))
        self.ep = ep
        self.tp = tp
        self.load = load
        mine = ep.expert_range(self.num_experts) if ep else range(self.num_experts)
        inter = split_evenly(expert_intermediate_size(config), *rank_of(tp), "moe_intermediate_size")
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)  # the router
        self.experts = Experts(len(mine), mine.start, config.hidden_size, inter)
        self.shared_expert = None
        if getattr(config, "shared_expert_intermediate_size", 0):
            self.shared_expert = dense_mlp(config.hidden_size, config.shared_expert_intermediate_size, tp,
                                           reduce_output=False)  # reduced with the experts' sum
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights [T, k] float32, expert ids [T, k]), as transformers' routers compute them."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        self.load.record(self.layer_idx, ids)
        if self.ep is None:
            out = self.experts(x, weights, ids)
        else:
            out = self.ep.run_experts(x, weights, ids, self.num_experts, self._unweighted_local_experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if self.tp is None else self.tp.all_reduce(out)


    def _unweighted_local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: one expert per received row; its owner weights the result."""
        ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        return self.experts(rows, ones, local_ids[:, None])


class MoeAttention(Attention):
    """llama.Attention plus the MoE configs' own flags: per-head q/k RMSNorm (Qwen3-MoE) and the
    q/k/v bias (Qwen2-MoE's `qkv_bias`), which llama.py keys on the dense model types."""

    def __init__(self, config, layer_idx: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__(config, layer_idx, tp)
        if getattr(config, "qkv_bias", False) and self.qkv_proj.bias is None:
            self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        if config.model_type == "qwen3_moe":
            self.qk_norm = True
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)


class MoeDecoderLayer(DecoderLayer):
    def __init__(self, config, layer_idx: int, ep: ExpertParallelGroup | None, load: ExpertLoadRecorder,
                 tp: TensorParallelGroup | None = None) -> None:
        nn.Module.__init__(self)  # DecoderLayer's own __init__ would build a dense MLP we replace
        self.self_attn = MoeAttention(config, layer_idx, tp)
        if is_sparse_layer(config, layer_idx):
            self.mlp = SparseMoeBlock(config, layer_idx, ep, load, tp)
        else:
            self.mlp = dense_mlp(config.hidden_size, config.intermediate_size, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeForCausalLM(LlamaForCausalLM):
    """Qwen3MoeForCausalLM, Qwen2MoeForCausalLM and MixtralForCausalLM. With `ep`, only the
    rank's experts are built and loaded; every rank must run every forward pass in step."""

    # Mixtral's checkpoint names -> ours (gate/up/down per expert)
    _expert_fragments = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
                         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                         "down_proj": ("down_proj", None)}
    # Padded rows would be routed to experts and counted in the expert-load statistics.
    mixed_step_graphs = False
    _per_expert = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\."
                             r"(weight|weight_scale|weight_scale_inv|input_scale|activation_scale)$")
    _stacked = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)"
                          r"(?:_(scale_inv|scale|activation_scale|input_scale))?$")

    def __init__(self, config, ep: ExpertParallelGroup | None = None, tp: TensorParallelGroup | None = None) -> None:
        nn.Module.__init__(self)  # LlamaForCausalLM's own __init__ would build dense layers
        check_sliding_window(config)
        if ep is not None and tp is not None:
            raise ValueError("expert and tensor parallelism together are not supported yet; use one")
        self.config = config
        self.ep = ep
        self.tp = tp
        moe_layers = [i for i in range(config.num_hidden_layers) if is_sparse_layer(config, i)]
        self.expert_load = ExpertLoadRecorder(moe_layers, num_experts_of(config))
        self.embed_tokens, self.lm_head = embedding_and_head(config, tp)
        self.layers = nn.ModuleList(MoeDecoderLayer(config, i, ep, self.expert_load, tp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.cos_sin: torch.Tensor | None = None

    def forward(self, input_ids, positions, ctx) -> torch.Tensor:
        self.expert_load.begin_step()
        return super().forward(input_ids, positions, ctx)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._experts_loaded: set[str] = set()
        super().load_weights(self._take_expert_weights(weights))
        self.expert_load.reset()  # its buffers came from to_empty()

    def quantize_fp8(self, scheme: Fp8Scheme) -> None:
        super().quantize_fp8(scheme)
        for name, module in self.named_modules():
            if isinstance(module, Experts) and not scheme.skips(name):
                module.quantize_fp8(scheme)

    def _take_expert_weights(self, weights):
        """Loads the experts' weights (this rank's slice) and passes every other weight on to the
        dense loader, with Mixtral's `block_sparse_moe` renamed to `mlp`."""
        params = dict(self.named_parameters())
        stacked_leaf = {None: "weight", "scale_inv": "weight_scale", "scale": "weight_scale",
                        "activation_scale": "input_scale", "input_scale": "input_scale"}
        for name, tensor in weights:
            name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
            if m := self._per_expert.match(name):
                prefix, expert, frag = m.group(1), int(m.group(2)), m.group(3)
                if frag not in self._expert_fragments:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                ours, shard = self._expert_fragments[frag]
                leaf = scale_leaf(m.group(4)) or m.group(4)
                self._load_expert(params, prefix, ours, shard, expert, tensor, leaf)
            elif m := self._stacked.match(name):
                prefix, ours, leaf = m.group(1), m.group(2), stacked_leaf[m.group(3)]
                experts = self.get_submodule(prefix)
                weight = getattr(experts, ours)
                for local in range(weight.shape[0]):
                    global_id = experts.first + local
                    one = tensor[global_id] if tensor.dim() > 0 and tensor.shape[0] > 1 else tensor
                    if ours == "down_proj" or leaf == "input_scale":
                        self._load_expert(params, prefix, ours, None, global_id, one, leaf)
                        continue
                    if leaf == "weight_scale" and experts.scheme is not None:
                        # The scale grid covers gate and up together: expand it to rows, then split.
                        one = expand_weight_scale(one, weight.shape[1], experts.gate_up_proj_scale.shape[2],
                                                  experts.scheme.weight_block, name)
                    for shard, half in enumerate(one.chunk(2, dim=0) if one.dim() else (one, one)):
                        self._load_expert(params, prefix, ours, shard, global_id, half, leaf)
            else:
                yield name, tensor

    def _load_expert(self, params, prefix: str, ours: str, shard: int | None, expert: int,
                     tensor: torch.Tensor, leaf: str = "weight") -> None:
        experts = self.get_submodule(prefix)
        local = expert - experts.first
        param = params[f"{prefix}.{ours}"]
        if not 0 <= local < param.shape[0]:
            return  # held by another rank
        what = f"{prefix}.{expert}.{ours}"
        rows = slice(None)
        if self.tp is not None:  # this rank's slice of the intermediate dimension
            tensor = take(tensor, (1 if ours == "down_proj" else 0, slice(experts.inter.start, experts.inter.stop)))
        if shard is not None:
            half = param.shape[1] // 2
            rows = slice(shard * half, (shard + 1) * half)
        if experts.scheme is not None:
            if leaf == "input_scale":
                return  # the MoE kernel multiplies in the activation dtype: a static scale is unused
            with torch.no_grad():
                filled = load_fp8_rows(param[local][rows], params[f"{prefix}.{ours}_scale"][local][rows], leaf,
                                       tensor, experts.scheme, what)
            for p in (("weight", "weight_scale") if filled == "weight+scale" else (filled,)):
                name = ours if p == "weight" else f"{ours}_scale"
                self._experts_loaded.add(f"{prefix}.{name}#{local}#{shard}")
            return
        if leaf != "weight":
            raise ValueError(f"{what}: unexpected {leaf!r} in a checkpoint without FP8 experts")
        if tensor.dtype == FP8_DTYPE:
            raise ValueError(f"{what}: the checkpoint stores it in FP8, but its config.json has no "
                             "quantization_config for it")
        target = param[local][rows]
        if target.shape != tensor.shape:
            raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        self._experts_loaded.add(f"{prefix}.{ours}#{local}#{shard}")

    def _shard_rows(self, param: torch.Tensor, fused: str, shard: int) -> slice:
        if fused == "gate_up_proj":  # dense and shared-expert MLPs differ in width
            half = param.shape[0] // 2
            return slice(shard * half, (shard + 1) * half)
        return super()._shard_rows(param, fused, shard)

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        loaded = set(loaded)
        for name, param in params.items():
            if not name.endswith((".experts.gate_up_proj", ".experts.down_proj",
                                  ".experts.gate_up_proj_scale", ".experts.down_proj_scale")):
                continue
            prefix, ours = name.rsplit(".", 1)
            shards = (0, 1) if ours.startswith("gate_up_proj") else (None,)
            if all(f"{prefix}.{ours}#{local}#{shard}" in self._experts_loaded
                   for local in range(param.shape[0]) for shard in shards):
                loaded.add(name)
        super()._check_complete(params, loaded)
