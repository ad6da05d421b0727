"""Time every Tandem kernel on one GPU at Llama-3-8B shapes (bf16) and report achieved
bandwidth (GB/s over the bytes each kernel must move) and, for prefill attention, TFLOP/s.

    python3 -m tandem.bench.kernels_bench --out bench/results/kernels_h100.json [--sweep]

Each kernel is timed two ways, both with L2 flushed before every call (cold cache):
`ms`, the median of triton.testing.do_bench (eager launches: on a slow host the launch cost
shows for tiny kernels), and `graph_ms`, calls replayed in a CUDA graph (as the engine runs
decode) minus the graph of the flushes alone. Bandwidth and TFLOP/s use `graph_ms`.
Writes JSON to --out and a markdown table beside it (.md).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
import triton.testing

from tandem.kernels import activation, block_copy, paged_attention, rmsnorm, rope, write_kv

# Llama-3-8B
HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4096, 14336, 32, 8, 128, 16
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16


@dataclass
class Result:
    kernel: str
    shape: str
    ms: float
    graph_ms: float | None
    bytes_moved: int
    gb_per_s: float
    copy_fraction: float  # gb_per_s over the device-to-device copy rate measured in this run
    tflops: float | None = None
    matmul_fraction: float | None = None  # tflops over the bf16 matmul rate measured in this run
    ref_ms: float | None = None  # the plain-torch reference on the same GPU
    extra: dict = field(default_factory=dict)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


_FLUSH: torch.Tensor | None = None


def graph_ms(fn, reps: int = 10) -> float | None:
    """Cold-cache time of fn without launch overhead: a CUDA graph of (flush L2, fn) x reps,
    minus a graph of the flushes alone. None when fn cannot be captured."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    try:
        with torch.cuda.stream(stream):
            fn()
            torch.cuda.synchronize()
            both, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(both, stream=stream):
                for _ in range(reps):
                    _FLUSH.zero_()
                    fn()
            with torch.cuda.graph(flush_only, stream=stream):
                for _ in range(reps):
                    _FLUSH.zero_()
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"  (no graph timing: {type(exc).__name__}: {exc})")
        torch.cuda.synchronize()
        return None

    def replay_ms(graph) -> float:
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return max(replay_ms(both) - replay_ms(flush_only), 1e-6) / reps


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # read + write


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    ms = bench_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def paged_cache(context_lens: list[int]):
    blocks = [math.ceil(n / BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks) + 8
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    table = torch.zeros(len(context_lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = order[used : used + n]
        used += n
    return k_cache, v_cache, table, torch.tensor(context_lens, dtype=torch.int32, device="cuda")


class Bench:
    def __init__(self, copy_rate: float, matmul_rate: float, with_ref: bool):
        self.copy_rate, self.matmul_rate, self.with_ref = copy_rate, matmul_rate, with_ref
        self.results: list[Result] = []

    def add(self, kernel, shape, fn, ref_fn, bytes_moved, flops=None, **extra):
        ms = bench_ms(fn)
        g_ms = graph_ms(fn)
        ref_ms = bench_ms(ref_fn) if self.with_ref and ref_fn is not None else None
        t = g_ms if g_ms is not None else ms
        gbps = bytes_moved / t / 1e6
        r = Result(kernel, shape, ms, g_ms, bytes_moved, gbps, gbps / self.copy_rate, ref_ms=ref_ms, extra=extra)
        if flops is not None:
            r.tflops = flops / t / 1e9
            r.matmul_fraction = r.tflops / self.matmul_rate
        self.results.append(r)
        line = (f"{kernel:24s} {shape:44s} {ms * 1e3:9.1f} us (graph {t * 1e3:8.1f} us) "
                f"{gbps:6.0f} GB/s ({r.copy_fraction:4.0%} of copy)")
        if r.tflops is not None:
            line += f" {r.tflops:6.1f} TFLOP/s ({r.matmul_fraction:4.0%} of matmul)"
        if ref_ms is not None:
            line += f"  ref {ref_ms * 1e3:9.1f} us"
        print(line, flush=True)


def run_all(b: Bench) -> None:
    kv_row = KV_HEADS * HEAD_DIM * ELEM

    for tokens in (64, 8192):
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        k_cache = torch.randn(tokens // BLOCK_SIZE + 64, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        v_cache = torch.randn_like(k_cache)
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:tokens]
        b.add("write_kv", f"T={tokens}", lambda: write_kv.write_kv(k, v, k_cache, v_cache, slots),
              lambda: write_kv.write_kv_ref(k, v, k_cache, v_cache, slots), 4 * tokens * kv_row)

    for batch, ctx in ((1, 1024), (1, 8192), (8, 4096), (32, 2048), (64, 8192), (256, 1024)):
        k_cache, v_cache, table, lens = paged_cache([ctx] * batch)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        splits = paged_attention.plan_decode_splits(batch, KV_HEADS, table.shape[1] * BLOCK_SIZE, 64,
                                                    torch.cuda.get_device_properties(0).multi_processor_count)
        bytes_moved = 2 * batch * ctx * kv_row + 2 * q.numel() * ELEM
        b.add("paged_decode_attention", f"B={batch} ctx={ctx}",
              lambda: paged_attention.paged_decode_attention(q, k_cache, v_cache, table, lens, HEAD_DIM**-0.5),
              lambda: paged_attention.paged_decode_attention_ref(q, k_cache, v_cache, table, lens, HEAD_DIM**-0.5),
              bytes_moved, num_splits=splits[0], split_len=splits[1])

    for q_lens, ctxs in (([4096], [4096]), ([512], [8192]), ([1024] * 4, [1024] * 4), ([2048, 512], [2048, 4608])):
        k_cache, v_cache, table, lens = paged_cache(ctxs)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        q = torch.randn(sum(q_lens), Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        # Causal work actually done: each query attends to (its position + 1) keys; QK and PV.
        visible = sum(sum(range(c - n + 1, c + 1)) for n, c in zip(q_lens, ctxs))
        flops = 4 * Q_HEADS * HEAD_DIM * visible
        bytes_moved = 2 * q.numel() * ELEM + 2 * sum(ctxs) * kv_row
        b.add("paged_prefill_attention", f"q_lens={q_lens} ctx={ctxs}",
              lambda: paged_attention.paged_prefill_attention(q, k_cache, v_cache, cu, table, lens, HEAD_DIM**-0.5),
              lambda: paged_attention.paged_prefill_attention_ref(q, k_cache, v_cache, cu, table, lens, HEAD_DIM**-0.5),
              bytes_moved, flops=flops)

    for tokens in (4096, 32768):
        num_ids = tokens // BLOCK_SIZE
        cache = torch.randn(2 * num_ids, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        ids = torch.randperm(cache.shape[0], device="cuda")[:num_ids]
        staging = block_copy.gather_blocks(cache, ids)
        bytes_moved = 2 * staging.numel() * ELEM
        b.add("gather_blocks", f"{tokens} tokens, one layer", lambda: block_copy.gather_blocks(cache, ids),
              lambda: block_copy.gather_blocks_ref(cache, ids), bytes_moved)
        b.add("scatter_blocks", f"{tokens} tokens, one layer", lambda: block_copy.scatter_blocks(staging, cache, ids),
              lambda: block_copy.scatter_blocks_ref(staging, cache, ids), bytes_moved)

    for tokens in (1, 256, 8192):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE)
        residual = torch.randn_like(x)
        weight = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
        b.add("rms_norm", f"T={tokens} hidden={HIDDEN}", lambda: rmsnorm.rms_norm(x, weight, 1e-5),
              lambda: rmsnorm.rms_norm_ref(x, weight, 1e-5), (2 * x.numel() + HIDDEN) * ELEM)
        b.add("fused_add_rms_norm", f"T={tokens} hidden={HIDDEN}",
              lambda: rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-5),
              lambda: rmsnorm.fused_add_rms_norm_ref(x, residual, weight, 1e-5), (4 * x.numel() + HIDDEN) * ELEM)

    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    cos_sin = rope.build_cos_sin_cache(inv_freq, 131072).cuda()
    for tokens in (1, 8192):
        q = torch.randn(tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        pos = torch.randint(0, 131072, (tokens,), device="cuda")
        bytes_moved = 2 * (q.numel() + k.numel()) * ELEM + tokens * HEAD_DIM * 4
        b.add("rope", f"T={tokens}", lambda: rope.rope(q, k, pos, cos_sin), lambda: rope.rope_ref(q, k, pos, cos_sin),
              bytes_moved)

    for tokens in (1, 8192):
        x = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
        b.add("silu_and_mul", f"T={tokens} intermediate={INTERMEDIATE}", lambda: activation.silu_and_mul(x),
              lambda: activation.silu_and_mul_ref(x), 3 * tokens * INTERMEDIATE * ELEM)


def sweep(b: Bench) -> list[dict]:
    """Tile choices for the two attention kernels (CUDA-graph, cold-cache timing), to pick the
    launchers' defaults."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, ctx in ((1, 8192), (8, 4096), (64, 2048)):
        k_cache, v_cache, table, lens = paged_cache([ctx] * batch)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        bytes_moved = 2 * batch * ctx * KV_HEADS * HEAD_DIM * ELEM
        configs = [(bn, w, st, 256) for bn in (32, 64, 128) for w in (2, 4) for st in (2, 3, 4)]
        configs += [(64, 2, 3, m) for m in (128, 512)]
        for block_n, warps, stages, min_split in configs:
            ns, sl = paged_attention.plan_decode_splits(batch, KV_HEADS, ctx, block_n, sms, min_split)
            try:
                ms = graph_ms(lambda: paged_attention.paged_decode_attention_split(
                    q, k_cache, v_cache, table, lens, HEAD_DIM**-0.5, ns, sl, block_n, warps, stages))
            except Exception as exc:  # noqa: BLE001 - out of resources for this tile
                print(f"decode B={batch} ctx={ctx} {block_n}/{warps}/{stages}: {type(exc).__name__}")
                continue
            if ms is None:
                continue
            rows.append(dict(kernel="decode", shape=f"B={batch} ctx={ctx}", block_n=block_n, num_warps=warps,
                             num_stages=stages, min_split_tokens=min_split, num_splits=ns, us=ms * 1e3,
                             gb_per_s=bytes_moved / ms / 1e6))
            print(f"sweep decode B={batch} ctx={ctx} block_n={block_n} warps={warps} stages={stages} "
                  f"min_split={min_split} splits={ns}: {ms * 1e3:.1f} us {bytes_moved / ms / 1e6:.0f} GB/s", flush=True)
    k_cache, v_cache, table, lens = paged_cache([4096])
    cu = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")
    q = torch.randn(4096, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    flops = 4 * Q_HEADS * HEAD_DIM * 4096 * 4097 // 2
    for tile_rows in (64, 128):
        for block_n in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    try:
                        ms = graph_ms(lambda: paged_attention.paged_prefill_attention_tiled(
                            q, k_cache, v_cache, cu, table, lens, HEAD_DIM**-0.5, tile_rows, block_n, warps, stages))
                    except Exception as exc:  # noqa: BLE001
                        print(f"prefill {tile_rows}/{block_n}/{warps}/{stages}: {type(exc).__name__}")
                        continue
                    if ms is None:
                        continue
                    rows.append(dict(kernel="prefill", shape="4k causal", rows=tile_rows, block_n=block_n,
                                     num_warps=warps, num_stages=stages, us=ms * 1e3, tflops=flops / ms / 1e9))
                    print(f"sweep prefill rows={tile_rows} block_n={block_n} warps={warps} stages={stages}: "
                          f"{flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# Kernel benchmark on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, bf16, Llama-3-8B shapes "
        f"({Q_HEADS} q heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}).",
        "",
        f"- **copy**: device-to-device copy of 1 GiB, {report['copy_gb_per_s']:.0f} GB/s counting bytes read + written.",
        f"- **matmul**: 8192^3 bf16 torch matmul, {report['matmul_tflops']:.0f} TFLOP/s.",
        "- **us**: median time of one eager call (triton.testing.do_bench, L2 flushed before each call; "
        "on this host the launch cost shows for tiny kernels).",
        "- **graph us**: the same call replayed in a CUDA graph, L2 flushed before each call, minus the "
        "flushes: the kernel's own cold-cache time, as the engine's graphed decode sees it.",
        "- **GB/s** (from graph us): bytes the kernel must move (inputs read once + outputs written) / time; "
        "**% copy** = that over the copy rate.",
        "- **TFLOP/s** (prefill attention): causal work actually needed (QK^T and PV over visible keys) / time; "
        "**% mm** = that over the matmul rate.",
        "- **ref us**: the plain-torch reference on the same GPU.",
        "",
        "| kernel | shape | us | graph us | GB/s | % copy | TFLOP/s | % mm | ref us |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else ""
        mm = f"{r['matmul_fraction']:.0%}" if r["matmul_fraction"] is not None else ""
        ref = f"{r['ref_ms'] * 1e3:.1f}" if r["ref_ms"] is not None else ""
        gus = f"{r['graph_ms'] * 1e3:.1f}" if r["graph_ms"] is not None else ""
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['ms'] * 1e3:.1f} | {gus} | {r['gb_per_s']:.0f} | "
                     f"{r['copy_fraction']:.0%} | {tf} | {mm} | {ref} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON output path (markdown goes beside it)")
    parser.add_argument("--sweep", action="store_true", help="also sweep attention tile choices")
    parser.add_argument("--no-ref", action="store_true", help="skip timing the torch references")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "kernels_bench needs a CUDA GPU"
    torch.manual_seed(0)

    copy_rate, matmul_rate = copy_gbps(), matmul_tflops()
    print(f"device {torch.cuda.get_device_name()}: copy {copy_rate:.0f} GB/s, matmul {matmul_rate:.0f} TFLOP/s")
    b = Bench(copy_rate, matmul_rate, with_ref=not args.no_ref)
    run_all(b)
    report = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), dtype="bfloat16",
        copy_gb_per_s=copy_rate, matmul_tflops=matmul_rate,
        results=[asdict(r) for r in b.results],
        sweep=[],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(report))
    args.out.write_text(json.dumps(report, indent=2))  # written now too, in case the sweep is cut off
    if args.sweep:
        report["sweep"] = sweep(b)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
