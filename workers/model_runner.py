"""Loads the model and its KV cache onto a device, and turns a `SchedulerOutput` into one
forward pass: packed token ids, positions, cache slots, block tables, then logits for the
sequences whose chunk reaches their end.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from workers.attention import ForwardContext
from workers.config import EngineConfig
from workers.models import model_class_for
from workers.models.llama import head_dim_of
from workers.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    logits_indices: torch.Tensor  # rows of the packed batch whose logits are needed


def load_hf_config(model_dir: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir!r} is not a Hugging Face model folder (no config.json)")
    return AutoConfig.from_pretrained(model_dir)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, weights=None) -> None:
        self.config = config
        self.hf_config = hf_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.model = self._load_model(weights)
        self.num_kv_blocks = config.num_kv_blocks or self._num_blocks_from_memory()
        self.kv_cache = torch.zeros(self.kv_cache_shape(self.num_kv_blocks), dtype=self.dtype, device=self.device)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from workers.cuda_graphs import CudaGraphDecoder

            max_model_len = config.max_model_len or hf_config.max_position_embeddings
            self.graphs = CudaGraphDecoder(self.model, self.kv_cache, -(-max_model_len // self.block_size),
                                           config.max_num_seqs)
            self.graphs.capture()

    # ---------------------------------------------------------------- set-up
    def _load_model(self, weights=None) -> torch.nn.Module:
        """From the folder's safetensors, or from `weights` ((name, tensor) pairs in HF naming)
        when given: benchmarks hand over an in-memory HF model's state dict that way."""
        from safetensors import safe_open

        cls = model_class_for(self.hf_config)
        files = sorted(glob.glob(os.path.join(self.config.model, "*.safetensors")))
        if not files and weights is None:
            raise FileNotFoundError(f"no *.safetensors weights in {self.config.model!r}")
        with torch.device("meta"):
            model = cls(self.hf_config)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.build_rope_table(self.device)

        def from_files():
            for path in files:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        model.load_weights(from_files() if weights is None else weights)
        return model.eval()

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        c = self.hf_config
        return (c.num_hidden_layers, 2, num_blocks, self.block_size, c.num_key_value_heads, head_dim_of(c))

    @property
    def bytes_per_block(self) -> int:
        shape = self.kv_cache_shape(1)
        n = 1
        for s in shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()

    def _num_blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - 2 * 1024**3  # activations
        else:
            budget = self.config.cpu_kv_cache_gb * 1024**3
        num = int(budget // self.bytes_per_block)
        if num < 1:
            raise RuntimeError("not enough memory for even one KV block; lower the model size or raise the "
                               "memory setting")
        return num

    # ------------------------------------------------------------------ steps
    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu = [0]
        logits_indices: list[int] = []
        max_blocks = 0
        for item in sched.scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            for pos in range(start, start + n):
                slots.append(seq.block_ids[pos // bs] * bs + pos % bs)
            context_lens.append(start + n)
            cu.append(cu[-1] + n)
            if item.samples:
                logits_indices.append(cu[-1] - 1)
            max_blocks = max(max_blocks, len(seq.block_ids))
        tables = torch.zeros((len(sched.scheduled), max_blocks), dtype=torch.int32)
        for i, item in enumerate(sched.scheduled):
            tables[i, : len(item.seq.block_ids)] = torch.tensor(item.seq.block_ids, dtype=torch.int32)
        dev = self.device

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        ctx = ForwardContext(
            slot_mapping=t(slots, torch.int64),
            block_tables=tables.to(dev, non_blocking=True),
            context_lens=t(context_lens, torch.int32),
            cu_seqlens_q=t(cu, torch.int32),
            is_decode=all(item.num_new_tokens == 1 for item in sched.scheduled),
            kv_cache=self.kv_cache,
        )
        return StepInputs(t(input_ids, torch.int64), t(positions, torch.int64), ctx, t(logits_indices, torch.int64))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns logits [num_sampling_seqs, vocab] (float32)."""
        inputs = self.prepare(sched)
        ctx = inputs.ctx
        if self.graphs is not None and ctx.is_decode and self.graphs.padded_size(len(sched.scheduled)):
            return self.graphs.run(inputs.input_ids, inputs.positions, ctx.slot_mapping, ctx.context_lens,
                                   ctx.block_tables, len(sched.scheduled))
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        return self.model.compute_logits(hidden[inputs.logits_indices]).float()
