"""Attention of one mixed step (decodes + a prompt chunk), padded as the mixed-step CUDA graph
pads it, timed per layer on a GPU for several kernel plans. A probe, not a benchmark:

    python bench/mixed_attention_probe.py --out /tmp/probe

Plans: the prefill kernel alone (decode rows as 16-token tiles), and the prefill kernel for the
chunks plus the split decode kernel for the one-token sequences (packed), over split counts and
pipeline stages. Llama-3-8B attention shapes (32 q heads, 8 KV heads, head_dim 128, bf16).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels_bench import graph_ms  # noqa: E402
from kernels import paged_attention as pa  # noqa: E402


def make_batch(num_decodes: int, decode_ctx: int, chunk: int, chunk_ctx: int, pad_seqs: int, pad_tokens: int):
    dev, dt, bs, kvh, hd = "cuda", torch.bfloat16, 16, 8, 128
    q_lens = [1] * num_decodes + [chunk]
    ctx = [decode_ctx] * num_decodes + [chunk_ctx]
    blocks = [-(-c // bs) for c in ctx]
    num_blocks = sum(blocks) + 8
    k = torch.randn(num_blocks, bs, kvh, hd, dtype=dt, device=dev)
    v = torch.randn_like(k)
    perm = torch.randperm(num_blocks, device=dev)
    width = 8192 // bs
    tables = torch.zeros(pad_seqs, width, dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    real_t = sum(q_lens)
    cu = torch.full((pad_seqs + 1,), real_t, dtype=torch.int32, device=dev)
    cu[: len(q_lens) + 1] = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.zeros(pad_seqs, dtype=torch.int32, device=dev)
    lens[: len(ctx)] = torch.tensor(ctx, dtype=torch.int32)
    q = torch.randn(pad_tokens, 32, hd, dtype=dt, device=dev)
    return q, k, v, cu, tables, lens, real_t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for num_decodes, decode_ctx, chunk, chunk_ctx in ((48, 650, 208, 1000), (200, 700, 56, 600), (8, 400, 248, 900)):
        q, k, v, cu, tables, lens, real_t = make_batch(num_decodes, decode_ctx, chunk, chunk_ctx, 256, 256)
        scale = 128 ** -0.5
        ref = pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, 64, 64, 4, 3)[:real_t]
        plans = {"prefill kernel only": lambda: pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale,
                                                                                 64, 64, 4, 3)}
        for splits in (1, 2, 4):
            for warps, stages in ((2, 1), (2, 2), (2, 3), (4, 2)):
                def plan(splits=splits, warps=warps, stages=stages):
                    out = pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, 64, 64, 4, 3,
                                                           skip_single=True)
                    return pa.paged_decode_attention_split(q, k, v, tables, lens, scale, splits, 64, 64, warps, stages,
                                                           cu_seqlens_q=cu, out=out)
                plans[f"split decode: {splits} splits, {warps} warps, {stages} stages"] = plan
        for name, fn in plans.items():
            err = (fn()[:real_t].float() - ref.float()).abs().max().item()
            ms = graph_ms(fn)
            rows.append(dict(num_decodes=num_decodes, decode_ctx=decode_ctx, chunk=chunk, chunk_ctx=chunk_ctx,
                             plan=name, us=None if ms is None else ms * 1e3, max_abs_diff=err))
            print(f"{num_decodes:4d} dec@{decode_ctx} + {chunk}@{chunk_ctx}: {name:45s} "
                  f"{rows[-1]['us']:8.1f} us  diff {err:.3g}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_attention_probe.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
