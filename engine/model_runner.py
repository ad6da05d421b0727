"""Loads the model and its KV cache onto a device, and turns a `SchedulerOutput` into one
forward pass: packed token ids, positions, cache slots, block tables, then logits for the
sequences whose chunk reaches their end.
"""
from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tandem.kernels import ops
from tandem.engine.attention import ForwardContext
from tandem.engine.config import EngineConfig
from tandem.engine.kv_quant import KVScaleReader, KVScales
from tandem.engine.memory_plan import MemoryPlan, plan_kv_pool
from tandem.engine.fp8 import check_fp8_device, fp8_scheme
from tandem.engine.models import model_class_for
from tandem.engine.models.llama import head_dim_of
from tandem.engine.scheduler import SchedulerOutput


# The step's index arrays, in the order they travel in ONE int64 buffer (host to device, and
# under tensor parallelism from rank 0 to the other ranks).
STEP_FIELDS = ("input_ids", "positions", "slots", "context_lens", "cu_seqlens_q", "logits_indices", "fix_dst",
               "fix_src", "block_tables")


@dataclass(frozen=True)
class StepLayout:
    """How a step's packed buffer is cut apart: the length of each of `STEP_FIELDS`, the batch's
    sequence count, block-table width and whether it is a pure decode step."""
    num_seqs: int
    width: int
    is_decode: bool
    lengths: tuple[int, ...]

    @property
    def has_fixes(self) -> bool:
        return self.lengths[STEP_FIELDS.index("fix_dst")] > 0


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
        self.kv_dtype = config.kv_cache_torch_dtype
        self.block_size = config.block_size
        self.kv_scales: KVScales | None = None  # an FP8 cache's per-layer scales (set by _load_model)
        self.model = self._load_model(weights)
        self.memory_plan: MemoryPlan | None = None  # how the device's memory was divided (CUDA, sized from memory)
        self.num_kv_blocks = config.num_kv_blocks or self._num_blocks_from_memory()
        self.kv_cache = torch.zeros(self.kv_cache_shape(self.num_kv_blocks), dtype=self.kv_dtype, device=self.device)
        # Host staging for step inputs: two pinned buffers used in turn, each with an event for
        # its last copy, so preparing step N+1 never waits on step N's copy (overlap scheduling).
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copy_done: list = [None, None]
        self._turn = 0
        self.graphs = None
        self.mixed_graphs = None
        if self.device.type == "cuda":
            self._warm_up()
        if self.device.type == "cuda" and not config.enforce_eager:
            from tandem.engine.cuda_graphs import CudaGraphDecoder, CudaGraphMixed

            max_blocks = -(-(config.max_model_len or hf_config.max_position_embeddings) // self.block_size)
            self.graphs = CudaGraphDecoder(self.model, self.kv_cache, max_blocks, config.max_num_seqs)
            self.graphs.capture()
            if getattr(self.model, "mixed_step_graphs", False):
                # One memory pool for all graphs: a graph's output is read before the next replay.
                self.mixed_graphs = CudaGraphMixed(self.model, self.kv_cache, max_blocks, config.max_num_seqs,
                                                   config.max_num_batched_tokens, pool=self.graphs.pool)
                self.mixed_graphs.capture()

    # ---------------------------------------------------------------- set-up
    def _load_model(self, weights=None) -> torch.nn.Module:
        """From the folder's safetensors, or from `weights` ((name, tensor) pairs in HF naming)
        when given: benchmarks hand over an in-memory HF model's state dict that way."""
        from safetensors import safe_open

        cls = model_class_for(self.hf_config)
        fp8 = fp8_scheme(self.hf_config, self.config.quantization)  # refuses unsupported checkpoints first
        if fp8 is not None:
            check_fp8_device(self.device)
        files = sorted(glob.glob(os.path.join(self.config.model, "*.safetensors")))
        if not files and weights is None:
            raise FileNotFoundError(f"no *.safetensors weights in {self.config.model!r}")
        with torch.device("meta"):
            # The dtype is set on the meta skeleton, so the device allocates the weights once, in
            # their own dtype: materialised in float32 first, the freed float32 copy stayed in the
            # caching allocator and was counted as in use when the KV pool was sized.
            model = self._build_model(cls).to(self.dtype)
            if fp8 is not None:
                # FP8 layers replace the linear ones before any memory is taken: the device never
                # holds the high-precision weights of a layer load_weights quantizes.
                model.quantize_fp8(fp8)
        model = model.to_empty(device=self.device)
        model.build_rope_table(self.device)

        def from_files():
            for path in files:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, self._read_weight(f, name)

        scale_reader = KVScaleReader(self.hf_config.num_hidden_layers)
        model.load_weights(scale_reader.filter(from_files() if weights is None else weights))
        if self.config.kv_cache_dtype != "auto":
            self.kv_scales = scale_reader.scales()
            for layer, k_scale, v_scale in zip(model.layers, self.kv_scales.k, self.kv_scales.v):
                layer.self_attn.k_scale, layer.self_attn.v_scale = k_scale, v_scale
        if self.device.type == "cuda" and not ops.skinny_gemv_enabled():
            # Column-major weights help cuBLAS (small batches, and 3-5% in mixed steps), but the
            # batch-1 GEMV needs row-major ones and gains more (engine_nvidia_h100_80gb_hbm3.md).
            model.use_column_major_weights()
        return model.eval()

    def _build_model(self, cls) -> torch.nn.Module:
        """The model skeleton (on the meta device); subclasses add constructor arguments."""
        return cls(self.hf_config)

    def idle(self) -> None:
        """The engine has nothing to step for now (a tensor-parallel leader pauses its followers)."""

    def _read_weight(self, f, name: str):
        """One checkpoint tensor from an open safetensors file (a tensor-parallel rank reads a
        lazy slice of it instead, and the model takes only its part)."""
        return f.get_tensor(name)

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        c = self.hf_config
        return (c.num_hidden_layers, 2, num_blocks, self.block_size, c.num_key_value_heads, head_dim_of(c))

    @property
    def bytes_per_block(self) -> int:
        shape = self.kv_cache_shape(1)
        n = 1
        for s in shape:
            n *= s
        return n * torch.tensor([], dtype=self.kv_dtype).element_size()

    def _num_blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            self.memory_plan = self._plan_memory()
            return self.memory_plan.num_blocks
        num = int(self.config.cpu_kv_cache_gb * 1024**3 // self.bytes_per_block)
        if num < 1:
            raise RuntimeError("not enough memory for even one KV block; raise cpu_kv_cache_gb")
        return num

    def _plan_memory(self) -> MemoryPlan:
        """The KV pool from measured needs (engine/memory_plan.py): profile steps at the token
        budget and at the largest CUDA-graph step, then what is in use with the cache emptied."""
        c = self.config
        activation = self._profile_peak(c.max_num_batched_tokens, sample=True)
        graphs = 0
        if not c.enforce_eager:
            from tandem.engine.cuda_graphs import decode_batch_sizes, mixed_token_sizes, static_output_bytes

            mixed = getattr(self.model, "mixed_step_graphs", False)
            largest = max([decode_batch_sizes(c.max_num_seqs)[-1]]
                          + (mixed_token_sizes(c.max_num_batched_tokens)[-1:] if mixed else []))
            graphs = self._profile_peak(largest, sample=False) + static_output_bytes(
                c.max_num_seqs, c.max_num_batched_tokens, self.hf_config.vocab_size, self.hf_config.hidden_size,
                torch.tensor([], dtype=self.dtype).element_size(), mixed)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(t.numel() * t.element_size() for t in itertools.chain(self.model.parameters(),
                                                                             self.model.buffers()))
        return plan_kv_pool(total, free, c.gpu_memory_utilization, weights, activation, graphs, self.bytes_per_block)

    def _profile_peak(self, num_tokens: int, sample: bool) -> int:
        """Bytes allocated at the peak of `_profile_step(num_tokens)` beyond what was allocated before."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        self._profile_step(num_tokens, sample)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before

    @torch.inference_mode()
    def _profile_step(self, num_tokens: int, sample: bool) -> None:
        """A throw-away step of `num_tokens` tokens shaped like the most demanding real one: as many
        sequences as may sample in a step (each reaching its end, so each gets logits), K/V written
        nowhere, attention over a one-block cache; with `sample`, raw logprobs and the sampler's
        top-k/top-p/min-p path over those rows (the largest sampling workspace)."""
        from tandem.engine.sampler import Sampler
        from tandem.protocol.sampling_params import SamplingParams

        dev, bs = self.device, self.block_size
        max_positions = self.hf_config.max_position_embeddings
        max_len = min(self.config.max_model_len or max_positions, max_positions)
        rows = max(1, min(self.config.max_num_seqs, num_tokens), -(-num_tokens // max_len))
        counts = torch.full((rows,), num_tokens // rows, dtype=torch.int32)
        counts[: num_tokens % rows] += 1
        cu = torch.zeros(rows + 1, dtype=torch.int32)
        torch.cumsum(counts, 0, out=cu[1:])
        positions = torch.arange(num_tokens) - torch.repeat_interleave(cu[:-1].long(), counts.long())
        width = -(-int(counts.max()) // bs)
        ctx = ForwardContext(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((rows, width), dtype=torch.int32, device=dev),
            context_lens=counts.to(dev),
            cu_seqlens_q=cu.to(dev),
            is_decode=num_tokens == rows,
            kv_cache=torch.zeros(self.kv_cache_shape(1), dtype=self.kv_dtype, device=dev),
        )
        load = getattr(self.model, "expert_load", None)
        if load is not None:
            load.paused = True  # a profile step is not traffic
        try:
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=dev), positions.to(dev), ctx)
        finally:
            if load is not None:
                load.paused = False
        logits = self.model.compute_logits(hidden[(cu[1:] - 1).long().to(dev)]).float()
        del hidden
        if sample:
            raw = Sampler.raw_logprobs(logits)
            probs = torch.softmax(logits.clone(), dim=-1)
            params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05)
            torch.multinomial(Sampler._filter(probs, [params] * rows), 1)
            del raw

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One throw-away prefill of two short sequences, so the prefill path's Triton kernels
        compile here at start-up instead of stalling the first requests' step (1-2 s each).
        Its slots are -1 (writes nowhere); it reads cache block 0, whatever that holds."""
        bs = self.block_size
        dev = self.device
        ids = torch.zeros(2 * bs, dtype=torch.int64, device=dev)
        positions = torch.arange(bs, device=dev).repeat(2)
        ctx = ForwardContext(
            slot_mapping=torch.full((2 * bs,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((2, 1), dtype=torch.int32, device=dev),
            context_lens=torch.full((2,), bs, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor([0, bs, 2 * bs], dtype=torch.int32, device=dev),
            is_decode=False,
            kv_cache=self.kv_cache,
        )
        hidden = self.model(ids, positions, ctx)
        self.model.compute_logits(hidden[[bs - 1, 2 * bs - 1]]).float()
        torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ steps
    def prepare(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None = None) -> StepInputs:
        """Build the step's index tensors on the host with numpy and ship them in ONE copy:
        per-step host work is kept to a few vectorised passes.

        Overlap scheduling: a sequence whose last token is a placeholder (sampled by the
        previous step, still on the device) gets that input id from `prev_tokens[seq.pending_row]`
        by a gather on the device, so no step waits for the host to read the previous tokens."""
        layout, packed = self.pack(sched, prev_tokens)
        return self.unpack(layout, self._to_device(packed), prev_tokens)

    def pack(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None) -> tuple[StepLayout, np.ndarray]:
        """The step's index arrays, concatenated on the host (see `prepare`)."""
        bs = self.block_size
        items = sched.scheduled
        num_seqs = len(items)
        starts = np.fromiter((it.seq.num_computed_tokens for it in items), dtype=np.int64, count=num_seqs)
        counts = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=num_seqs)
        is_decode = bool((counts == 1).all())
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        num_tokens = int(cu[-1])
        if is_decode:
            input_ids = np.fromiter((it.seq.token_ids[-1] for it in items), dtype=np.int64, count=num_seqs)
        else:
            input_ids = np.fromiter(itertools.chain.from_iterable(
                it.seq.token_ids[it.seq.num_computed_tokens : it.seq.num_computed_tokens + it.num_new_tokens]
                for it in items), dtype=np.int64, count=num_tokens)
        seq_of_token = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1], counts) + np.repeat(starts, counts)
        # Block tables, padded to the longest; filled with one scatter.
        lens = np.fromiter((len(it.seq.block_ids) for it in items), dtype=np.int64, count=num_seqs)
        width = int(lens.max()) if num_seqs else 0
        tables = np.zeros((num_seqs, width), dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(it.seq.block_ids for it in items), dtype=np.int64,
                           count=int(lens.sum()))
        row_starts = np.zeros(num_seqs, dtype=np.int64)
        np.cumsum(lens[:-1], out=row_starts[1:])
        tables[np.repeat(np.arange(num_seqs), lens), np.arange(len(flat)) - np.repeat(row_starts, lens)] = flat
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        context_lens = starts + counts
        samples = (context_lens == np.fromiter((it.seq.num_tokens for it in items), dtype=np.int64, count=num_seqs))
        logits_indices = (cu[1:] - 1)[samples]
        # Placeholder inputs: only a one-token decode item can end in one (its seq sampled last step).
        pending_rows = np.fromiter((it.seq.pending_row if it.seq.num_pending else -1 for it in items),
                                   dtype=np.int64, count=num_seqs)
        has_pending = pending_rows >= 0
        fix_dst, fix_src = cu[:-1][has_pending], pending_rows[has_pending]
        if len(fix_dst) and prev_tokens is None:
            raise RuntimeError("a scheduled sequence ends in a placeholder but no previous step's tokens were given")
        fields = {"input_ids": input_ids, "positions": positions, "slots": slots, "context_lens": context_lens,
                  "cu_seqlens_q": cu, "logits_indices": logits_indices, "fix_dst": fix_dst, "fix_src": fix_src,
                  "block_tables": tables.ravel()}
        layout = StepLayout(num_seqs, width, is_decode, tuple(len(fields[name]) for name in STEP_FIELDS))
        return layout, np.concatenate([fields[name] for name in STEP_FIELDS])

    def unpack(self, layout: StepLayout, dev_buf: torch.Tensor, prev_tokens: torch.Tensor | None,
               fill_placeholders: bool = True) -> StepInputs:
        """The step's tensors as views of its one device buffer; placeholder input ids filled
        from `prev_tokens` (in place in the buffer) unless `fill_placeholders` is False."""
        bounds = np.cumsum([0, *layout.lengths])
        on_device = {name: dev_buf[bounds[k]:bounds[k + 1]] for k, name in enumerate(STEP_FIELDS)}
        if fill_placeholders and layout.has_fixes:
            on_device["input_ids"].index_copy_(0, on_device["fix_dst"],
                                               prev_tokens.index_select(0, on_device["fix_src"]))
        ctx = ForwardContext(
            slot_mapping=on_device["slots"],
            block_tables=on_device["block_tables"].view(layout.num_seqs, layout.width).to(torch.int32),
            context_lens=on_device["context_lens"].to(torch.int32),
            cu_seqlens_q=on_device["cu_seqlens_q"].to(torch.int32),
            is_decode=layout.is_decode,
            kv_cache=self.kv_cache,
        )
        return StepInputs(on_device["input_ids"], on_device["positions"], ctx, on_device["logits_indices"])

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        """One host-to-device copy through a reused pinned buffer (pinning anew each step costs
        more than the copy). The copy is ordered before the step's kernels on the same stream.
        Two buffers alternate; before one is rewritten we wait for its previous copy (an event),
        which ran two steps ago."""
        host = torch.from_numpy(packed)
        if self.device.type != "cuda":
            return host
        turn = self._turn
        self._turn ^= 1
        pinned = self._pinned[turn]
        if pinned is None or pinned.numel() < host.numel():
            pinned = self._pinned[turn] = torch.empty(max(host.numel(), 1 << 16), dtype=torch.int64).pin_memory()
        if self._copy_done[turn] is not None:
            self._copy_done[turn].synchronize()
        staging = pinned[: host.numel()]
        staging.copy_(host)
        on_device = staging.to(self.device, non_blocking=True)
        done = self._copy_done[turn] = torch.cuda.Event()
        done.record()
        return on_device

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None = None,
                layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Launch one step; returns logits [num_sampling_seqs, vocab] (float32), not waited for.
        `prev_tokens`: the previous step's sampled tokens, for placeholder inputs (see prepare).
        `layer_done(i)`: called as each layer's KV is written; such a step runs eagerly."""
        return self.forward(self.prepare(sched, prev_tokens), len(sched.scheduled), layer_done)

    def forward(self, inputs: StepInputs, num_seqs: int, layer_done: Callable[[int], None] | None = None
                ) -> torch.Tensor:
        """The step's forward pass (a CUDA graph where one fits) and its sampling rows' logits."""
        ctx = inputs.ctx
        if layer_done is not None:
            ctx.layer_done = layer_done
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
            return self.model.compute_logits(hidden[inputs.logits_indices]).float()
        if self.graphs is not None and ctx.is_decode and self.graphs.padded_size(num_seqs):
            return self.graphs.run(inputs.input_ids, inputs.positions, ctx.slot_mapping, ctx.context_lens,
                                   ctx.block_tables, num_seqs)
        mixed = self.mixed_graphs
        if mixed is not None and not ctx.is_decode and mixed.padded_size(len(inputs.input_ids), num_seqs):
            hidden = mixed.run(inputs.input_ids, inputs.positions, ctx)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        return self.model.compute_logits(hidden[inputs.logits_indices]).float()
