"""Turns the last-position logits of a step into next tokens: penalties, temperature, top-k,
top-p, min-p, per-request seeds, and logprobs of the chosen and top-n tokens.

Logprobs are reported from the model's raw distribution (before penalties and temperature),
as vLLM does by default.
"""
from __future__ import annotations

import torch

from tandem.engine.sequence import Sequence
from tandem.engine.structured import TokenMask
from tandem.kernels import ops
from tandem.protocol.logprob import Logprob


# Sampler._filter's rows per pass (its workspace is this many rows' sort).
FILTER_ROWS = 64
# Rows at most this many: argmax in two stages (see greedy_argmax).
_SPLIT_ARGMAX_MAX_ROWS = 16
_SPLIT_ARGMAX_CHUNKS = 256


def greedy_argmax(logits: torch.Tensor, split: bool | None = None) -> torch.Tensor:
    """`logits.argmax(-1)`, the same index (the first maximum), faster for a few long rows.

    On the GPU, one 128k-vocab row is a single reduction that torch runs on few blocks: 27.5 us
    per batch-1 decode step on an H100 (bench/results/probes/step_profile_h100_colmajor.json), 14.0 us
    in these two stages (step_profile_h100_session5_unmerged_fused_split_merge.json; batch 1 is
    the only size measured). Split into chunks, the first stage has many independent rows: max
    of each chunk, then the first chunk holding the row's maximum, then that chunk's own first
    maximum. Ties resolve to the first index either way: `max(dim)` and `argmax` return the
    first maximal index.
    `split`: force the two-stage path on or off (None: GPU, few rows, long rows)."""
    rows, vocab = logits.shape
    if split is None:
        split = logits.is_cuda and rows <= _SPLIT_ARGMAX_MAX_ROWS and vocab >= 4 * _SPLIT_ARGMAX_CHUNKS
    if not split:
        return logits.argmax(dim=-1)
    width = -(-vocab // _SPLIT_ARGMAX_CHUNKS)
    padded = width * _SPLIT_ARGMAX_CHUNKS
    if padded != vocab:  # -inf padding never wins (an all -inf or NaN row: see the test)
        logits = torch.nn.functional.pad(logits, (0, padded - vocab), value=float("-inf"))
    chunk_max, chunk_arg = logits.view(rows, _SPLIT_ARGMAX_CHUNKS, width).max(dim=-1)
    best_chunk = chunk_max.argmax(dim=-1, keepdim=True)
    return (best_chunk * width + chunk_arg.gather(1, best_chunk)).squeeze(1)


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: set[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.generators: dict[str, torch.Generator] = {}  # seq_key -> seeded generator

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_key, None)

    @staticmethod
    def needs_known_tokens(params) -> bool:
        """Sampling that reads the sequence's previous tokens or counts (penalties, min_tokens)
        or reports logprobs: the engine runs such steps without overlap."""
        return params.logprobs is not None or params.has_penalties or params.min_tokens > 0

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], mask: TokenMask | None = None) -> torch.Tensor:
        """Next token per row as an int64 tensor on the logits' device. No host sync (the
        overlap scheduler relies on it) except for penalties, which read the token history.
        `mask`: grammar masks for some rows, applied to `logits` in place first (one launch)."""
        if mask is not None:
            with torch.inference_mode():  # the runner's logits are inference tensors
                ops.apply_token_bitmask(logits, mask.bitmask, mask.rows)
        params = [s.sampling_params for s in seqs]
        if all(p.greedy and not p.has_penalties and p.min_tokens == 0 for p in params):
            return greedy_argmax(logits)
        logits = logits.float().clone()
        vocab = logits.shape[-1]
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if p.has_penalties:
                self._apply_penalties(logits[row], seq, vocab)
            if seq.num_output_tokens < p.min_tokens:
                banned = list((set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids))
                banned = [t for t in banned if t < vocab]
                if banned:
                    logits[row, banned] = float("-inf")
        tokens = greedy_argmax(logits)  # greedy rows keep theirs
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return tokens
        dev = logits.device
        rows = _to(dev, random_rows, torch.int64)
        temps = _to(dev, [params[i].temperature for i in random_rows], torch.float32)
        probs = torch.softmax(logits.index_select(0, rows) / temps[:, None], dim=-1)
        probs = self._filter(probs, [params[i] for i in random_rows])
        # Seeded rows draw from their own generator (reproducible whatever the batch); the rest
        # draw together from the global one.
        seeded = [j for j, i in enumerate(random_rows) if params[i].seed is not None]
        if len(seeded) < len(random_rows):
            picked = torch.multinomial(probs, 1).squeeze(1)
        else:
            picked = torch.empty(len(random_rows), dtype=torch.int64, device=dev)
        for j in seeded:
            gen = self._generator(seqs[random_rows[j]], probs[j])
            picked[j : j + 1] = torch.multinomial(probs[j], 1, generator=gen)
        return tokens.index_copy_(0, rows, picked)

    @staticmethod
    def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
        """The model's own distribution (before penalties and temperature), as logprobs."""
        return torch.log_softmax(logits.float(), dim=-1)

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence, vocab: int) -> None:
        p = seq.sampling_params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device, dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if seq.num_output_tokens and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(seq.output_token_ids, device=row.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _filter(probs: torch.Tensor, params) -> torch.Tensor:
        """Top-k, top-p (nucleus) and min-p on rows of probabilities; renormalised. Rows are
        filtered `FILTER_ROWS` at a time: the sort and its companions take ~40 bytes per element,
        over 2 GB for 512 rows of a 128k vocabulary at once, memory the KV pool would have to
        leave free (engine/memory_plan.py)."""
        if probs.shape[0] > FILTER_ROWS:
            return torch.cat([Sampler._filter(probs[i : i + FILTER_ROWS], params[i : i + FILTER_ROWS])
                              for i in range(0, probs.shape[0], FILTER_ROWS)])
        top_k = [p.top_k if p.top_k > 0 else probs.shape[-1] for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if all(k >= probs.shape[-1] for k in top_k) and all(tp >= 1.0 for tp in top_p) and not any(min_p):
            return probs
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        keep = ranks < _to(probs.device, top_k, torch.int64)[:, None]
        cumulative = sorted_probs.cumsum(dim=-1)
        # keep a token if the mass before it is below top_p (the first token always stays)
        keep &= (cumulative - sorted_probs) < _to(probs.device, top_p, torch.float32)[:, None]
        keep &= sorted_probs >= _to(probs.device, min_p, torch.float32)[:, None] * sorted_probs[:, :1]
        sorted_probs = sorted_probs * keep
        filtered = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        return filtered / filtered.sum(dim=-1, keepdim=True)

    def _generator(self, seq: Sequence, probs_row: torch.Tensor) -> torch.Generator | None:
        """The sequence's own generator, made at its first draw here. A sequence that already
        has output tokens then (a continuation: they were sampled on another replica, one draw
        each) starts where that generator stood: the same draws are replayed first, on a row of
        `probs_row`'s shape, so a seeded stream continues exactly as it would have."""
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(seq.seq_key)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed + seq.output_index)  # n > 1: distinct but reproducible outputs
            if seq.num_output_tokens:
                uniform = torch.ones_like(probs_row)
                for _ in range(seq.num_output_tokens):
                    torch.multinomial(uniform, 1, generator=gen)
            self.generators[seq.seq_key] = gen
        return gen

    @staticmethod
    def logprobs(row: torch.Tensor, token: int, top_n: int) -> dict[int, Logprob]:
        chosen = float(row[token])
        rank = int((row > row[token]).sum().item()) + 1
        result = {token: Logprob(token, chosen, rank)}
        if top_n:
            values, indices = row.topk(top_n)
            for r, (v, i) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
                result.setdefault(i, Logprob(i, v, r))
        return result


def _to(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `device` without waiting for the device (`torch.tensor(...,
    device=cuda)` would synchronise the stream, stalling the overlap scheduler)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
