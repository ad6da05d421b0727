"""CUDA graphs for decode steps: one graph per padded batch size, captured once, replayed with
the step's inputs copied into static buffers. A decode step then costs one graph launch
instead of hundreds of kernel launches (the gap that dominates batch-1 decode).

Padded rows write nowhere (slot -1) and have context length 0 (the attention kernel returns
zeros for them); their logits are dropped.
"""
from __future__ import annotations

import torch

from workers.attention import ForwardContext

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphDecoder:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, max_blocks_per_seq: int,
                 max_batch_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = [b for b in DEFAULT_BATCH_SIZES if b <= max_batch_size] or [1]
        max_bs = self.batch_sizes[-1]
        dev = kv_cache.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((max_bs, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = ForwardContext(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs],
                             self.cu_seqlens_q[: bs + 1], True, self.kv_cache)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so smaller graphs reuse the big one's memory pool.
        for bs in reversed(self.batch_sizes):
            self._forward(bs)  # warm up: compiles the Triton kernels for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

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
