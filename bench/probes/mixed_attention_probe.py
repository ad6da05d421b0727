"""Tile sweep of the paged prefill attention kernel on mixed steps (decodes + a prompt chunk),
padded as the mixed-step CUDA graph pads them (256 sequences, 256 tokens), and on a 4k prompt.
A probe, not a benchmark; on a GPU:

    python bench/probes/mixed_attention_probe.py --out /tmp/probe
    python bench/probes/mixed_attention_probe.py --out /tmp/probe --padding   # the current tile only,
        # each mixed batch padded to 256 sequences (as the graph pads), to 64, and not at all
    ncu --clock-control none -k regex:_paged_prefill_kernel --launch-skip 2 --launch-count 1 \
        python bench/probes/mixed_attention_probe.py --once 0   # one mixed batch (MIXED[0]), the current
        # tile, three calls: for a profiler
    python bench/probes/mixed_attention_probe.py --out /tmp/probe --occupancy   # a few tiles with fewer
        # stages and capped registers (192 registers and 83 KB of shared memory per program allow
        # only 2 programs per multiprocessor: ncu on the H100)
    # (`--splits`, splitting each tile's positions into parts merged by a second kernel, is at
    # commit 40952ec with the kernel change it measured; slower, reverted: bench/results)

Each row: one batch, one tile (query rows, KV positions per step, warps, stages), the kernel's
cold-L2 time per call in a CUDA graph (`bench/kernels_bench.graph_ms`), and its largest
difference from the current tile's output. Llama-3-8B attention shapes (32 q heads, 8 KV heads,
head_dim 128, bf16).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tandem.bench.kernels_bench import graph_ms
from tandem.kernels import paged_attention as pa

# (decodes, their context, chunk tokens, the chunk's context after the step)
MIXED = ((48, 650, 208, 1000), (120, 600, 136, 800), (200, 700, 56, 600), (8, 400, 248, 900))


def make_batch(q_lens: list[int], ctx: list[int], pad_seqs: int, pad_tokens: int):
    dev, dt, bs, kvh, hd = "cuda", torch.bfloat16, 16, 8, 128
    blocks = [-(-c // bs) for c in ctx]
    num_blocks = sum(blocks) + 8
    k = torch.randn(num_blocks, bs, kvh, hd, dtype=dt, device=dev)
    v = torch.randn_like(k)
    perm = torch.randperm(num_blocks, device=dev)
    tables = torch.zeros(pad_seqs, 8192 // bs, dtype=torch.int32, device=dev)
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


def timed_against(fn, ref: torch.Tensor, real_t: int, label: str) -> tuple[float, float] | None:
    """(largest difference from ref over the real rows, cold-L2 ms), or None when this tile or
    config does not fit the GPU's resources."""
    try:
        diff = (fn()[:real_t].float() - ref).abs().max().item()
        return diff, graph_ms(fn)
    except Exception as exc:  # noqa: BLE001 - a tile out of resources: report and go on
        print(f"{label}: {type(exc).__name__}", flush=True)
        return None


def write_rows(out: Path, name: str, command: str | None, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if command:
        head["command"] = command
    (out / name).write_text(json.dumps(dict(head, rows=rows), indent=1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--padding", action="store_true",
                    help="time the current tile on each mixed batch at several sequence paddings instead")
    ap.add_argument("--once", type=int, default=None, metavar="I",
                    help="only run the current kernel three times on mixed batch I (under a profiler)")
    ap.add_argument("--occupancy", action="store_true",
                    help="time a few tiles with fewer stages and capped registers per thread instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.occupancy:
        return occupancy_probe(Path(args.out))
    if args.once is not None:
        d, dc, c, cc = MIXED[args.once]
        q, k, v, cu, tables, lens, _ = make_batch([1] * d + [c], [dc] * d + [cc], 256, 256)
        for _ in range(3):
            pa.paged_prefill_attention(q, k, v, cu, tables, lens, 128 ** -0.5)
        torch.cuda.synchronize()
        return 0
    if args.padding:
        return padding_probe(Path(args.out))
    batches = {f"{d} decodes@{dc} + {c}@{cc}": make_batch([1] * d + [c], [dc] * d + [cc], 256, 256)
               for d, dc, c, cc in MIXED}
    batches["4k prompt"] = make_batch([4096], [4096], 1, 4096)
    tiles = [(r, n, w, s) for r in (16, 32) for n in (32, 64, 128) for w in (2, 4) for s in (2, 3)]
    tiles += [(r, n, w, s) for r in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    current = (64, 64, 4, 3)
    rows = []
    for name, (q, k, v, cu, tables, lens, real_t) in batches.items():
        scale = 128 ** -0.5
        ref = pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, *current)[:real_t].float()
        for tile in tiles:
            def fn(tile=tile):
                return pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, *tile)
            timed = timed_against(fn, ref, real_t, f"{name}: {tile}")
            if timed is None:
                continue
            diff, ms = timed
            rows.append(dict(batch=name, rows=tile[0], block_n=tile[1], num_warps=tile[2], num_stages=tile[3],
                             us=None if ms is None else ms * 1e3, max_abs_diff=diff, current=tile == current))
            print(f"{name:28s} {str(tile):18s} {rows[-1]['us']:8.1f} us  diff {diff:.3g}", flush=True)
    print("\nbest per batch (current tile in brackets):")
    for name in batches:
        mine = [r for r in rows if r["batch"] == name and r["us"] is not None]
        best = min(mine, key=lambda r: r["us"])
        cur = next(r for r in mine if r["current"])
        print(f"{name:28s} best {best['rows']}/{best['block_n']}/{best['num_warps']}/{best['num_stages']} "
              f"{best['us']:.1f} us  [{cur['us']:.1f} us]")
    write_rows(Path(args.out), "mixed_attention_tiles.json", None, rows)
    return 0


def occupancy_probe(out: Path) -> int:
    """ncu on the H100 (48 decodes + a chunk): 192 registers per thread and 83 KB of shared memory
    per program leave 2 programs (8 warps) per multiprocessor, and warps wait on global loads.
    Do fewer stages and a register cap (3-4 programs per multiprocessor) read faster?"""
    rows = []
    scale = 128 ** -0.5
    configs = [(64, 64, 4, 3, None), (64, 64, 4, 2, None), (64, 64, 4, 2, 168), (64, 64, 4, 3, 168),
               (64, 64, 4, 2, 128), (64, 32, 4, 2, 128), (64, 32, 4, 3, 128), (64, 32, 4, 2, 168)]
    shapes = [([1] * d + [c], [dc] * d + [cc], f"{d} decodes@{dc} + {c}@{cc}", 256) for d, dc, c, cc in MIXED]
    shapes.append(([4096], [4096], "4k prompt", 1))
    for q_lens, ctx, name, pad in shapes:
        q, k, v, cu, tables, lens, real_t = make_batch(q_lens, ctx, pad, max(256, sum(q_lens)))
        ref = pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, 64, 64, 4, 3)[:real_t].float()
        for cfg in configs:
            fn = lambda: pa.paged_prefill_attention_tiled(q, k, v, cu, tables, lens, scale, *cfg)  # noqa: E731
            timed = timed_against(fn, ref, real_t, f"{name}: {cfg}")
            if timed is None:
                continue
            diff, ms = timed
            rows.append(dict(batch=name, rows=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3],
                             maxnreg=cfg[4], us=ms * 1e3, max_abs_diff=diff))
            print(f"{name:28s} {str(cfg):26s} {ms * 1e3:7.1f} us, diff {diff:.3g}", flush=True)
    write_rows(out, "mixed_attention_occupancy.json", "python bench/probes/mixed_attention_probe.py --occupancy", rows)
    return 0


def padding_probe(out: Path) -> int:
    """The prefill kernel's grid is (tokens // BLOCK_Q + sequences) x KV heads, so padding a mixed
    step to 256 sequences adds programs that only find they own no tile. What do they cost?"""
    rows = []
    scale = 128 ** -0.5
    for d, dc, c, cc in MIXED:
        q_lens, ctx = [1] * d + [c], [dc] * d + [cc]
        kv_bytes = 2 * 8 * 128 * 2 * sum(ctx)  # K and V, 8 heads, head_dim 128, bf16: read once
        ref = None
        for pad in (256, 64, len(q_lens)):
            if pad < len(q_lens):
                continue
            torch.manual_seed(0)
            q, k, v, cu, tables, lens, real_t = make_batch(q_lens, ctx, pad, 256)
            fn = lambda: pa.paged_prefill_attention(q, k, v, cu, tables, lens, scale)  # noqa: E731
            got = fn()[:real_t].float()
            ref = got if ref is None else ref
            ms = graph_ms(fn)
            rows.append(dict(batch=f"{d} decodes@{dc} + {c}@{cc}", pad_seqs=pad, us=ms * 1e3,
                             kv_gb_s=kv_bytes / (ms * 1e-3) / 1e9, max_abs_diff=(got - ref).abs().max().item()))
            print(f"{rows[-1]['batch']:28s} seqs padded to {pad:3d}: {ms * 1e3:7.1f} us, "
                  f"KV read at {rows[-1]['kv_gb_s']:.0f} GB/s", flush=True)
    write_rows(out, "mixed_attention_padding.json", "python bench/probes/mixed_attention_probe.py --padding", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
