"""FP8 (e4m3) weights: which scheme a model runs (read from its checkpoint's
`quantization_config`, or `EngineConfig.quantization="fp8"` on a bf16/fp32 checkpoint), the
FP8 linear layer that replaces the models' `nn.Linear`s, and how checkpoint tensors land in it.

Checkpoints read (the layouts vLLM's `Fp8Config` / `CompressedTensorsConfig` and transformers'
`FineGrainedFP8Config` load):
- `quant_method: "fp8"`: `<layer>.weight` e4m3 with `<layer>.weight_scale` (per tensor, as
  AutoFP8 / vLLM write it) or `<layer>.weight_scale_inv` (transformers / DeepSeek-V3 / Qwen3-FP8:
  per tensor, or per 128 x 128 block with `weight_block_size`); `activation_scheme` "dynamic"
  or "static" (`<layer>.input_scale`, transformers' `activation_scale`). Skipped modules:
  `modules_to_not_convert` / `ignored_layers`.
- `quant_method: "compressed-tensors"`, format "float-quantized", one 8-bit float scheme for
  `Linear`: weights per tensor, per channel or per block; activations dynamic (per token) or
  static per tensor; modules in `ignore` skipped.
Anything else is refused at start-up, before any weight is read.

Scales are kept as `kernels/fp8.py` lays them out ([N, G] float32, per row), so the fused
q/k/v and gate/up layers hold each checkpoint shard's own scales exactly. The LM head and the
MoE router stay in the model dtype, as in the checkpoints above.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels import ops
from tandem.kernels.fp8 import FP8_DTYPE, quantize_rows
from tandem.engine.config import QUANTIZATIONS


@dataclass(frozen=True)
class Fp8Scheme:
    """How a model's FP8 weights are laid out. Built once by `fp8_scheme`."""

    from_checkpoint: bool  # weights are e4m3 in the checkpoint (else quantized per channel while loading)
    weight_block: tuple[int, int] | None = None  # the checkpoint's scale tile (rows, cols); None: per tensor / channel
    static_activations: bool = False  # the checkpoint's per-layer `input_scale` (else dynamic per token)
    ignored: tuple[str, ...] = ()  # checkpoint module names left unquantized ("re:" prefix: a regex)

    def group_k(self, in_features: int) -> int:
        """Columns per weight scale: the block's width, or the whole row."""
        return self.weight_block[1] if self.weight_block else in_features

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_k(in_features))

    def skips(self, hf_module: str) -> bool:
        """Whether the checkpoint keeps this module (HF name, without "model.") unquantized."""
        for entry in self.ignored:
            if entry.startswith("re:"):
                if re.match(entry[3:], hf_module) or re.match(entry[3:], "model." + hf_module):
                    return True
                continue
            entry = entry.removeprefix("model.")
            if hf_module == entry or hf_module.endswith("." + entry) or f".{entry}." in f".{hf_module}.":
                return True
        return False


def fp8_scheme(hf_config, quantization: str | None) -> Fp8Scheme | None:
    """The scheme the model runs, from the checkpoint's `quantization_config` and the engine's
    `quantization` setting; ValueError (naming what is unsupported) for anything else."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {quantization!r}; supported: {QUANTIZATIONS}")
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return Fp8Scheme(from_checkpoint=False) if quantization == "fp8" else None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_method(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise ValueError(f"unsupported quantization_config.quant_method {method!r} in the checkpoint's config.json; "
                     "Tandem loads FP8 checkpoints (quant_method 'fp8', or 'compressed-tensors' with 8-bit float "
                     "weights) and quantizes bf16/fp32 ones with quantization='fp8'")


def _block(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{what} must be two positive integers, got {value!r}")
    return (value[0], value[1])


def _fp8_method(qc: dict) -> Fp8Scheme:
    activation = str(qc.get("activation_scheme", "dynamic")).lower()
    if activation not in ("dynamic", "static"):
        raise ValueError(f"unsupported fp8 activation_scheme {activation!r} (dynamic or static)")
    for key, allowed in (("fmt", "e4m3"), ("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if qc.get(key) is not None and qc[key] != allowed:
            raise ValueError(f"unsupported fp8 quantization_config {key}={qc[key]!r} (Tandem reads {allowed!r})")
    ignored = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
    return Fp8Scheme(from_checkpoint=True, weight_block=_block(qc.get("weight_block_size"), "weight_block_size"),
                     static_activations=activation == "static", ignored=tuple(ignored))


def _compressed_tensors(qc: dict) -> Fp8Scheme:
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    if fmt != "float-quantized" or len(groups) != 1:
        raise ValueError(f"unsupported compressed-tensors checkpoint (format {fmt!r}, {len(groups)} config "
                         "groups); Tandem reads one 'float-quantized' 8-bit float scheme")
    group = groups[0]
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    if "Linear" not in (group.get("targets") or []):
        raise ValueError(f"unsupported compressed-tensors targets {group.get('targets')!r} (Tandem reads ['Linear'])")
    if (weights.get("type") != "float" or weights.get("num_bits") != 8 or weights.get("dynamic")
            or not weights.get("symmetric", True) or weights.get("strategy") not in ("tensor", "channel", "block")):
        raise ValueError(f"unsupported compressed-tensors weight scheme {weights!r}; Tandem reads symmetric 8-bit "
                         "float weights with tensor, channel or block scales")
    block = _block(weights.get("block_structure"), "block_structure") if weights["strategy"] == "block" else None
    static = False
    if acts is not None:
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise ValueError(f"unsupported compressed-tensors activation scheme {acts!r} (8-bit float only)")
        static = not acts.get("dynamic", True)
        if static and acts.get("strategy") != "tensor":
            raise ValueError(f"unsupported static activation strategy {acts.get('strategy')!r} (per tensor only)")
    return Fp8Scheme(from_checkpoint=True, weight_block=block, static_activations=static,
                     ignored=tuple(qc.get("ignore") or ()))


# ------------------------------------------------------------------ checkpoint tensors -> rows

_SCALE_NAMES = {"weight_scale": "weight_scale", "weight_scale_inv": "weight_scale",
                "input_scale": "input_scale", "activation_scale": "input_scale"}


def scale_leaf(leaf: str) -> str | None:
    """Our name for a checkpoint's scale tensor (`weight_scale_inv` -> `weight_scale`), or None."""
    return _SCALE_NAMES.get(leaf)


def expand_weight_scale(scale: torch.Tensor, rows: int, groups: int, block: tuple[int, int] | None,
                        what: str) -> torch.Tensor:
    """A checkpoint's weight scale for `rows` rows as [rows, groups]: a per-tensor scalar, per-channel
    [rows] / [rows, 1], or block-wise [ceil(rows / bn), groups] (also transformers' layout of a grid
    that divides the rows evenly)."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, groups)
    if scale.dim() == 1:
        scale = scale[:, None]
    if scale.dim() == 2 and scale.shape == (rows, 1) and groups == 1:
        return scale
    if block is not None and scale.dim() == 2 and scale.shape[1] == groups:
        grid = scale.shape[0]
        if grid == math.ceil(rows / block[0]):
            per = block[0]
        elif rows % grid == 0:
            per = rows // grid
        else:
            per = 0
        if per:
            return scale.repeat_interleave(per, dim=0)[:rows]
    raise ValueError(f"{what}: weight scale of shape {tuple(scale.shape)} does not fit {rows} rows in "
                     f"{groups} column group(s) (weight_block_size {block})")


def load_fp8_rows(weight: torch.Tensor, weight_scale: torch.Tensor, leaf: str, tensor: torch.Tensor,
                  scheme: Fp8Scheme, what: str) -> str:
    """Writes one checkpoint tensor into the rows `weight` [n, K] / `weight_scale` [n, G] (views of
    a layer's parameters) and returns the parameter it filled ("weight", "weight_scale"), or
    "weight+scale" for a high-precision weight quantized here per channel."""
    if leaf == "weight":
        if tensor.shape != weight.shape:
            raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(weight.shape)}")
        if tensor.dtype == FP8_DTYPE:
            if not scheme.from_checkpoint:
                raise ValueError(f"{what}: an FP8 weight in a checkpoint whose config.json has no quantization_config")
            weight.copy_(tensor)
            return "weight"
        if scheme.from_checkpoint:
            raise ValueError(f"{what}: the checkpoint is FP8 but stores this layer as {tensor.dtype} "
                             "(not in its ignored / modules_to_not_convert list)")
        q, scale = quantize_rows(tensor.to(weight.device))
        weight.copy_(q)
        weight_scale.copy_(scale.expand_as(weight_scale))
        return "weight+scale"
    if leaf == "weight_scale":
        if not scheme.from_checkpoint:
            raise ValueError(f"{what}: a weight scale in a checkpoint whose config.json has no quantization_config")
        weight_scale.copy_(expand_weight_scale(tensor, weight_scale.shape[0], weight_scale.shape[1],
                                               scheme.weight_block, what))
        return "weight_scale"
    raise ValueError(f"{what}: unexpected tensor {leaf!r} in the checkpoint")


class Fp8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight [out, in] and float32 scales [out, G]
    (`kernels/fp8.py`); `input_scale` is the static activation scale (None: dynamic, per token).
    `forward` is `ops.linear`: the batch-1 GEMV, `torch._scaled_mm`, or the dequantizing reference."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Fp8Scheme,
                 device: torch.device, bias_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.group_k = scheme.group_k(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, scheme.num_groups(in_features), dtype=torch.float32, device=device),
            requires_grad=False)
        # Shards of a fused layer may bring different static scales: the largest keeps them all in range.
        self.input_scale = (nn.Parameter(torch.zeros((), dtype=torch.float32, device=device), requires_grad=False)
                            if scheme.static_activations else None)
        self._input_scale_loaded = False
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        # CPU only: round activations through e4m3 as the GPU's FP8 GEMM does (accuracy checks).
        self.quantize_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_k={self.group_k}, "
                f"static_input={self.input_scale is not None}")

    @torch.no_grad()
    def load(self, leaf: str, tensor: torch.Tensor, rows: slice, what: str) -> list[str]:
        """One checkpoint tensor (`weight`, a scale, or `bias`) for the rows of one shard; returns
        the parameter names it filled."""
        if leaf == "bias":
            self.bias[rows].copy_(tensor)
            return ["bias"]
        if leaf == "input_scale":
            if self.input_scale is None:
                return []  # dynamic scheme: per-token scales are computed, a stored one is unused
            scale = tensor.float().max().to(self.input_scale.device)
            self.input_scale.copy_(torch.maximum(self.input_scale, scale) if self._input_scale_loaded else scale)
            self._input_scale_loaded = True
            return ["input_scale"]
        filled = load_fp8_rows(self.weight[rows], self.weight_scale[rows], leaf, tensor, self.scheme, what)
        return ["weight", "weight_scale"] if filled == "weight+scale" else [filled]


def check_fp8_device(device: torch.device) -> None:
    """ValueError at start-up where the GPU has no FP8 (e4m3) support: compute capability < 8.9."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                         f"{torch.cuda.get_device_capability(device)}")


def fp8_linear_like(linear: nn.Linear, scheme: Fp8Scheme) -> Fp8Linear:
    """An empty Fp8Linear of `linear`'s shape, on its device, for the loader to fill."""
    return Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                     linear.weight.device, linear.weight.dtype)


def set_quantize_input(model: nn.Module, on: bool) -> None:
    """CPU path: round every FP8 layer's activations through e4m3 too (as the GPU does)."""
    for module in model.modules():
        if hasattr(module, "quantize_input"):
            module.quantize_input = on
