"""Time the fused MoE kernel on one GPU against a per-expert loop (the plain-torch reference,
which is how transformers runs its experts), at Qwen3-30B-A3B and Mixtral-8x7B expert shapes
(bf16), from decode-sized batches to long prefills; report achieved bandwidth and TFLOP/s.

    python3 -m tandem.bench.moe_bench --out bench/results/moe_h100.json [--sweep] [--quick]

Timing as bench/kernels_bench.py does it (L2 flushed before every call): `ms` eager, `graph_ms`
replayed in a CUDA graph (the fused kernel has no host sync, so decode graphs can hold it).
The per-expert loop syncs with the host, so it gets eager timings only.

- bytes: weights of the experts the batch actually routes to (each read once) + x + the output
  + the kernel's intermediate writes/reads; GB/s = bytes / time.
- FLOPs: 6 * T * k * H * I (gate and up, then down, over every routed pair); TFLOP/s = FLOPs / time.
Writes JSON to --out and a markdown table beside it (.md).
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from tandem.bench.kernels_bench import bench_ms, copy_gbps, graph_ms, matmul_tflops
from tandem.kernels.fused_moe import MoeTiles, fused_moe, fused_moe_ref, pick_tiles

DTYPE = torch.bfloat16
ELEM = 2

MODELS = {
    "qwen3_30b_a3b": dict(hidden=2048, inter=768, num_experts=128, top_k=8),
    "mixtral_8x7b": dict(hidden=4096, inter=14336, num_experts=8, top_k=2),
}
TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
QUICK_TOKENS = [1, 128, 2048]
SWEEP_TILES = [MoeTiles(m, n, k, w, s) for m, n, k, w, s in [
    (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3),
    (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
]]


@dataclass
class Result:
    model: str
    num_tokens: int
    routing: str
    experts_hit: int
    ms: float
    graph_ms: float | None
    loop_ms: float | None  # per-expert loop (plain-torch reference), eager
    speedup_vs_loop: float | None
    bytes_moved: int
    gb_per_s: float
    copy_fraction: float
    tflops: float
    matmul_fraction: float
    tiles: str


def make_case(model: str, num_tokens: int, routing: str):
    s = MODELS[model]
    hidden, inter, num_experts, top_k = s["hidden"], s["inter"], s["num_experts"], s["top_k"]
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=DTYPE)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(DTYPE)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).to(DTYPE)
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    if routing == "hot":  # an eighth of the experts draw most tokens
        logits[:, : max(1, num_experts // 8)] += 3.0
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return x, w13, w2, weights, ids


def moved_bytes(model: str, num_tokens: int, experts_hit: int) -> int:
    s = MODELS[model]
    hidden, inter, top_k = s["hidden"], s["inter"], s["top_k"]
    pairs = num_tokens * top_k
    weights = experts_hit * 3 * hidden * inter
    activations = 2 * num_tokens * hidden + 2 * pairs * inter + 2 * pairs * hidden
    return (weights + activations) * ELEM


def run_case(model, num_tokens, routing, copy_rate, matmul_rate, with_loop, tiles=None) -> Result:
    x, w13, w2, weights, ids = make_case(model, num_tokens, routing)
    tiles = tiles or pick_tiles(ids.numel(), w13.shape[0], x.device)
    fn = lambda: fused_moe(x, w13, w2, weights, ids, tiles=tiles)  # noqa: E731
    ms = bench_ms(fn)
    g_ms = graph_ms(fn)
    loop_ms = bench_ms(lambda: fused_moe_ref(x, w13, w2, weights, ids)) if with_loop else None
    t = g_ms if g_ms is not None else ms
    hit = int(torch.unique(ids).numel())
    nbytes = moved_bytes(model, num_tokens, hit)
    s = MODELS[model]
    flops = 6 * num_tokens * s["top_k"] * s["hidden"] * s["inter"]
    gbps, tflops = nbytes / t / 1e6, flops / t / 1e9
    r = Result(model, num_tokens, routing, hit, ms, g_ms, loop_ms, loop_ms / ms if loop_ms else None,
               nbytes, gbps, gbps / copy_rate, tflops, tflops / matmul_rate,
               f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k} w{tiles.num_warps} s{tiles.num_stages}")
    loop = f"  loop {loop_ms * 1e3:9.1f} us ({r.speedup_vs_loop:5.1f}x)" if loop_ms else ""
    print(f"{model:14s} T={num_tokens:5d} {routing:7s} hit {hit:3d}  {ms * 1e3:9.1f} us "
          f"(graph {t * 1e3:9.1f} us) {gbps:6.0f} GB/s ({r.copy_fraction:4.0%}) "
          f"{tflops:6.1f} TFLOP/s ({r.matmul_fraction:4.0%}) [{r.tiles}]{loop}", flush=True)
    return r


def sweep(copy_rate, matmul_rate, tokens) -> list[dict]:
    """Every tile choice per (model, tokens); the best, to tune pick_tiles."""
    best = []
    for model in MODELS:
        for num_tokens in tokens:
            rows = []
            for tiles in SWEEP_TILES:
                try:
                    rows.append(run_case(model, num_tokens, "uniform", copy_rate, matmul_rate, False, tiles))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip that tile
                    print(f"  tiles {tiles}: {type(exc).__name__}: {exc}")
            if rows:
                top = min(rows, key=lambda r: r.graph_ms or r.ms)
                best.append(dict(model=model, num_tokens=num_tokens, tiles=top.tiles,
                                 graph_ms=top.graph_ms, ms=top.ms))
    return best


def markdown(report: dict) -> str:
    lines = [
        f"# Fused MoE benchmark on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, bf16. Shapes: "
        + "; ".join(f"{m}: H={s['hidden']}, I={s['inter']}, E={s['num_experts']}, k={s['top_k']}"
                    for m, s in MODELS.items()) + ".",
        "",
        f"- copy: {report['copy_gb_per_s']:.0f} GB/s (1 GiB device copy, read + write); "
        f"matmul: {report['matmul_tflops']:.0f} TFLOP/s (8192^3 bf16).",
        "- us: eager median (L2 flushed); graph us: replayed in a CUDA graph minus the flushes.",
        "- GB/s: (weights of the experts hit + activations) / graph time; TFLOP/s: 6·T·k·H·I / graph time.",
        "- loop us: per-expert loop in plain torch (the reference; how transformers runs experts), eager.",
        "",
        "| model | T | routing | experts hit | us | graph us | GB/s | % copy | TFLOP/s | % mm | loop us | x loop | tiles |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["results"]:
        g = f"{r['graph_ms'] * 1e3:.1f}" if r["graph_ms"] is not None else ""
        loop = f"{r['loop_ms'] * 1e3:.1f}" if r["loop_ms"] is not None else ""
        speed = f"{r['speedup_vs_loop']:.1f}" if r["speedup_vs_loop"] is not None else ""
        lines.append(f"| {r['model']} | {r['num_tokens']} | {r['routing']} | {r['experts_hit']} | {r['ms'] * 1e3:.1f} | "
                     f"{g} | {r['gb_per_s']:.0f} | {r['copy_fraction']:.0%} | {r['tflops']:.1f} | "
                     f"{r['matmul_fraction']:.0%} | {loop} | {speed} | {r['tiles']} |")
    if report["sweep"]:
        lines += ["", "## Best tiles per shape (--sweep)", "", "| model | T | tiles | graph us |", "| --- | ---: | --- | ---: |"]
        for s in report["sweep"]:
            g = f"{s['graph_ms'] * 1e3:.1f}" if s["graph_ms"] is not None else ""
            lines.append(f"| {s['model']} | {s['num_tokens']} | {s['tiles']} | {g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON output path (markdown goes beside it)")
    parser.add_argument("--sweep", action="store_true", help="also time every tile choice per shape")
    parser.add_argument("--quick", action="store_true", help=f"only T in {QUICK_TOKENS}")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-expert loop")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "moe_bench needs a CUDA GPU"
    torch.manual_seed(0)
    tokens = QUICK_TOKENS if args.quick else TOKENS

    copy_rate, matmul_rate = copy_gbps(), matmul_tflops()
    print(f"device {torch.cuda.get_device_name()}: copy {copy_rate:.0f} GB/s, matmul {matmul_rate:.0f} TFLOP/s")
    results = [run_case(model, n, "uniform", copy_rate, matmul_rate, not args.no_loop)
               for model in MODELS for n in tokens]
    results += [run_case(model, 2048, "hot", copy_rate, matmul_rate, not args.no_loop) for model in MODELS]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), dtype="bfloat16", copy_gb_per_s=copy_rate,
                  matmul_tflops=matmul_rate, models=MODELS, results=[asdict(r) for r in results], sweep=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    if args.sweep:
        report["sweep"] = sweep(copy_rate, matmul_rate, tokens)
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
