"""The KV cache's storage format (`EngineConfig.kv_cache_dtype`, checked in engine/config.py:
"auto", the model's dtype; "fp8", e4m3, half the bytes of bf16) and the per-layer K/V scales an
FP8 cache is written and read with.

Scales follow vLLM's convention: per tensor (one K and one V scale per layer), the cache holds
x / scale in e4m3 and readers multiply by scale (kernels/write_kv.py, kernels/paged_attention.py).
A checkpoint may carry them (`model.layers.N.self_attn.k_scale` / `v_scale`, ModelOpt's
`self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale`, or the deprecated single
`self_attn.kv_scale` for both); without them every scale is 1.0, as in vLLM. They are read off the
weight stream before the model's loader sees it, and dropped when the cache is not FP8.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from tandem.kernels.write_kv import FP8_KV_DTYPE

log = logging.getLogger(__name__)



def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if kv_cache_dtype == "auto" else FP8_KV_DTYPE


@dataclass(frozen=True)
class KVScales:
    """One K and one V dequantization scale per layer (1.0 where the checkpoint has none)."""

    k: tuple[float, ...]
    v: tuple[float, ...]

    @classmethod
    def ones(cls, num_layers: int) -> "KVScales":
        return cls((1.0,) * num_layers, (1.0,) * num_layers)

    def flat(self) -> list[float]:
        """k0, v0, k1, v1, ...: the form `kvtransfer` compares."""
        return [s for pair in zip(self.k, self.v) for s in pair]


_SCALE_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.k_scale|v_proj\.v_scale)$")
# Scales of FP8 *attention* (queries, probabilities), which Tandem does not run: dropped, as vLLM
# drops them when its attention is not FP8.
_UNUSED_ATTENTION_SCALE = re.compile(r"(?:model\.)?layers\.\d+\.self_attn\.(q_scale|prob_scale)$")


@dataclass
class KVScaleReader:
    """Passes a checkpoint's (name, tensor) stream through, keeping its KV scales aside."""

    num_layers: int
    found: dict[tuple[str, int], float] = field(default_factory=dict)

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            m = _SCALE_NAME.search(name)
            if m is None:
                if not _UNUSED_ATTENTION_SCALE.search(name):
                    yield name, tensor
                continue
            layer, kind = int(m.group(1)), m.group(2).split(".")[-1]
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"checkpoint has {name!r} but the model has {self.num_layers} layers")
            if tensor.numel() != 1:
                raise ValueError(f"{name!r}: a per-tensor KV scale must be one number, got shape "
                                 f"{tuple(tensor.shape)} (per-head / per-channel KV scales are not supported)")
            value = float(tensor.float().item())
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name!r}: KV scale must be a finite positive number, got {value}")
            for k in (("k_scale", "v_scale") if kind == "kv_scale" else (kind,)):
                self.found[(k, layer)] = value

    def scales(self) -> KVScales:
        """The scales read, checked to cover every layer; all 1.0 (with a warning) if none were."""
        if not self.found:
            log.warning("FP8 KV cache without scales in the checkpoint: every K/V scale is 1.0 (as vLLM); "
                        "values beyond +-448 saturate")
            return KVScales.ones(self.num_layers)
        missing = [f"{kind}[{i}]" for kind in ("k_scale", "v_scale") for i in range(self.num_layers)
                   if (kind, i) not in self.found]
        if missing:
            raise ValueError(f"checkpoint has KV scales for some layers but not for {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
        return KVScales(tuple(self.found[("k_scale", i)] for i in range(self.num_layers)),
                        tuple(self.found[("v_scale", i)] for i in range(self.num_layers)))
