"""Turns the last-position logits of a step into next tokens: penalties, temperature, top-k,
top-p, min-p, per-request seeds, and logprobs of the chosen and top-n tokens.

Logprobs are reported from the model's raw distribution (before penalties and temperature),
as vLLM does by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.sequence import Logprob, Sequence


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, Logprob] | None  # chosen token + top-n, when asked


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: set[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.generators: dict[str, torch.Generator] = {}  # seq_key -> seeded generator

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_key, None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        logits = logits.float()
        params = [s.sampling_params for s in seqs]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if all(p.greedy and not p.has_penalties and p.min_tokens == 0 for p in params):
            token_ids = logits.argmax(dim=-1).tolist()
        else:
            token_ids = self._sample(logits.clone(), seqs)

        results = []
        for row, (seq, token) in enumerate(zip(seqs, token_ids)):
            lp = None
            if want_logprobs[row]:
                lp = self._logprobs(raw_logprobs[row], token, params[row].logprobs)
            results.append(SampleResult(token, lp))
        return results

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
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

        greedy_rows = [i for i, s in enumerate(seqs) if s.sampling_params.greedy]
        tokens = [0] * len(seqs)
        if greedy_rows:
            picked = logits[greedy_rows].argmax(dim=-1).tolist()
            for i, t in zip(greedy_rows, picked):
                tokens[i] = t
        random_rows = [i for i, s in enumerate(seqs) if not s.sampling_params.greedy]
        if not random_rows:
            return tokens
        temps = torch.tensor([seqs[i].sampling_params.temperature for i in random_rows],
                             device=logits.device, dtype=torch.float32)
        probs = torch.softmax(logits[random_rows] / temps[:, None], dim=-1)
        probs = self._filter(probs, [seqs[i].sampling_params for i in random_rows])
        for j, i in enumerate(random_rows):
            seq = seqs[i]
            gen = self._generator(seq)
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=gen).item())
        return tokens

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
        """Top-k, top-p (nucleus) and min-p on rows of probabilities; renormalised."""
        top_k = [p.top_k if p.top_k > 0 else probs.shape[-1] for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if all(k >= probs.shape[-1] for k in top_k) and all(tp >= 1.0 for tp in top_p) and not any(min_p):
            return probs
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        keep = ranks < torch.tensor(top_k, device=probs.device)[:, None]
        cumulative = sorted_probs.cumsum(dim=-1)
        # keep a token if the mass before it is below top_p (the first token always stays)
        keep &= (cumulative - sorted_probs) < torch.tensor(top_p, device=probs.device)[:, None]
        keep &= sorted_probs >= torch.tensor(min_p, device=probs.device)[:, None] * sorted_probs[:, :1]
        sorted_probs = sorted_probs * keep
        filtered = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        return filtered / filtered.sum(dim=-1, keepdim=True)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(seq.seq_key)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed + seq.output_index)  # n > 1: distinct but reproducible outputs
            self.generators[seq.seq_key] = gen
        return gen

    @staticmethod
    def _logprobs(row: torch.Tensor, token: int, top_n: int) -> dict[int, Logprob]:
        chosen = float(row[token])
        rank = int((row > row[token]).sum().item()) + 1
        result = {token: Logprob(token, chosen, rank)}
        if top_n:
            values, indices = row.topk(top_n)
            for r, (v, i) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
                result.setdefault(i, Logprob(i, v, r))
        return result
