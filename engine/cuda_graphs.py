"""CUDA graphs: one graph per padded size, captured once, replayed with the step's inputs
copied into static buffers. A step then costs one graph launch instead of hundreds of kernel
launches from Python.

- `CudaGraphDecoder`: decode steps (one token per sequence), per padded batch size. Padded rows
  write nowhere (slot -1) and have context length 0 (the attention kernel returns zeros for
  them); their logits are dropped. Every size's graph writes its float32 logits into one shared
  buffer (rows [0, bs)), made before capture: a static output per size would hold
  sum(sizes) x vocab x 4 bytes for as long as the graphs live (1.5 GB at a 128k vocabulary and
  sizes up to 512); one step's logits are read before the next replay anyway.
- `CudaGraphMixed`: any other step (prompt chunks, with or without decodes), per padded token
  count, up to `max_num_seqs` sequences. Eagerly, such a step costs ~20 ms of host time on an
  H100 host (bench/results: step traces), so small-budget chunked prefill was host-bound.
  Padding: the sequence count is always the maximum; padded sequences have no query tokens and
  context length 0, padded tokens belong to no sequence and write nowhere. The prefill
  attention kernel's grid comes from shapes only, and its programs for empty sequences return
  at once. Padded tokens' hidden rows are garbage, and no kernel mixes rows, so real rows are
  untouched; only the real rows' logits are computed (eagerly, after the replay).
"""
from __future__ import annotations

import torch

from tandem.engine.attention import ForwardContext


def capture_graphs(sizes, forward, graphs: dict, outputs: dict, pool):
    """One graph per size of `forward(size)`, largest first so the smaller ones reuse the big
    one's memory pool; fills `graphs` and `outputs` (the graphs' static outputs) and returns the
    pool (`pool` if given)."""
    for size in sorted(sizes, reverse=True):
        forward(size)  # warm up: compiles the Triton kernels for this shape
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        if pool is None:
            pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize()
    return pool


DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphDecoder:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, max_blocks_per_seq: int,
                 max_batch_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = decode_batch_sizes(max_batch_size)
        max_bs = self.batch_sizes[-1]
        dev = kv_cache.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_bs, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.logits_out = torch.empty((max_bs, model.lm_head.weight.shape[0]), dtype=torch.float32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # views of logits_out
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = ForwardContext(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs],
                             self.cu_seqlens_q[: bs + 1], True, self.kv_cache)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
        out = self.logits_out[:bs]
        out.copy_(self.model.compute_logits(hidden))  # the float32 conversion, into the shared buffer
        return out

    @torch.inference_mode()
    def capture(self) -> None:
        self.pool = capture_graphs(self.batch_sizes, self._forward, self.graphs, self.logits, self.pool)

    def padded_size(self, n: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= n), None)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor, logits_rows: int) -> torch.Tensor:
        """Inputs for n real rows (any device); returns logits [n, vocab]."""
        n = input_ids.shape[0]
        bs = self.padded_size(n)
        assert bs is not None
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[n:bs].fill_(-1)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        self.context_lens[n:bs].fill_(0)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:logits_rows]


DEFAULT_MIXED_TOKEN_SIZES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    return [b for b in DEFAULT_BATCH_SIZES if b <= max_num_seqs] or [1]


def mixed_token_sizes(max_num_batched_tokens: int) -> list[int]:
    return [t for t in DEFAULT_MIXED_TOKEN_SIZES if t <= max_num_batched_tokens]


def static_output_bytes(max_num_seqs: int, max_num_batched_tokens: int, vocab: int, hidden: int,
                        dtype_bytes: int, mixed: bool) -> int:
    """What the graphs' outputs hold for as long as they live: the decode graphs' shared logits
    buffer and each mixed graph's hidden-state output (memory planning, engine/memory_plan.py)."""
    decode = decode_batch_sizes(max_num_seqs)[-1] * vocab * 4
    return decode + (sum(mixed_token_sizes(max_num_batched_tokens)) * hidden * dtype_bytes if mixed else 0)


class CudaGraphMixed:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, max_blocks_per_seq: int,
                 max_num_seqs: int, max_tokens: int, pool=None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.token_sizes = mixed_token_sizes(max_tokens)
        self.max_num_seqs = max_num_seqs
        max_t = self.token_sizes[-1] if self.token_sizes else 0
        dev = kv_cache.device
        self.input_ids = torch.zeros(max_t, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_t, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_t,), -1, dtype=torch.int64, device=dev)
        self.cu_seqlens_q = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.pool = pool

    def _forward(self, num_tokens: int) -> torch.Tensor:
        ctx = ForwardContext(self.slot_mapping[:num_tokens], self.block_tables, self.context_lens,
                             self.cu_seqlens_q, False, self.kv_cache)
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], ctx)

    @torch.inference_mode()
    def capture(self) -> None:
        # Captured with no sequence holding a token (cu all 0): the kernels' grids depend only on
        # the shapes, so the same graph serves any batch that fits.
        self.pool = capture_graphs(self.token_sizes, self._forward, self.graphs, self.hidden, self.pool)

    def padded_size(self, num_tokens: int, num_seqs: int) -> int | None:
        if num_seqs > self.max_num_seqs:
            return None
        return next((t for t in self.token_sizes if t >= num_tokens), None)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The step's packed inputs (T tokens of B sequences, on the device) -> hidden [T, hidden].
        The returned rows are a view of the graph's output: read them before the next replay."""
        num_tokens, num_seqs = input_ids.shape[0], ctx.context_lens.shape[0]
        t_pad = self.padded_size(num_tokens, num_seqs)
        assert t_pad is not None
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(ctx.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens:t_pad].fill_(-1)
        self.cu_seqlens_q[: num_seqs + 1].copy_(ctx.cu_seqlens_q, non_blocking=True)
        self.cu_seqlens_q[num_seqs + 1 :].fill_(num_tokens)  # padded sequences: no query tokens
        self.context_lens[:num_seqs].copy_(ctx.context_lens, non_blocking=True)
        self.context_lens[num_seqs:].fill_(0)
        self.block_tables[:num_seqs, : ctx.block_tables.shape[1]].copy_(ctx.block_tables, non_blocking=True)
        self.graphs[t_pad].replay()
        return self.hidden[t_pad][:num_tokens]
