"""Does prefetching the next projection's weights into L2, on a side stream while the batch-1
step's small kernels run, shorten a decode layer? A probe for choosing, not a benchmark of record.

    python bench/probes/l2_prefetch_probe.py [--json PATH]      # on a GPU

Why: at batch 1 every projection is a weight read, yet HBM sits idle while the small kernels
between them run (norms, RoPE, KV write, attention: ~0.6 ms of a 6.06 ms Llama-3-8B step on an
H100), and each cuBLAS GEMV pays ~3 us of ramp-up (`gemv_probe_h100.json`: qkv's 50 MB take
20.2 us, 16.8 us of it at 3 TB/s). Reading the next weights' first megabytes into L2 during
that idle time would move HBM work off the critical path. (What did work instead: the batch-1
GEMV of `kernels/gemv.py`, which reads its first weight tile before waiting for the kernel
before it, through programmatic dependent launch.)

A layer here is the 8B layer's kernel sequence at batch 1 with 32 distinct weight sets (so every
projection reads HBM): add+RMSNorm, qkv, four small kernels standing in for RoPE / KV write /
attention / split merge, o_proj, add+RMSNorm, gate_up, SiLU-and-mul, down. It is captured in one
CUDA graph and timed per layer, for: no prefetch, and prefetch of the first `cap` MB of each
projection's weight issued on a side stream as soon as the previous projection finished
(`prefetch.global.L2::evict_last` per 128-byte line, or plain loads with evict_last), with and
without the projection waiting for its prefetch.

Result on an H100 (`bench/results/probes/l2_prefetch_probe_h100.json`, measured before kernels/pdl.py
existed, so its small kernels ran without programmatic dependent launch): no gain. 170.2-170.7 us per
layer without prefetch, 169.3 us at best with it (noise), and slower as the prefetch grows
(182.8 us at 24 MB): the side stream's reads compete with the projection's own.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from tandem.bench.probes.gemv_probe import write_json
from tandem.kernels import ops

H, I, QKV, LAYERS = 4096, 14336, 6144, 32
# The prefetch kernels live here, not in kernels/: the probe found no gain, so the engine has none.

LINE = 128  # bytes per L2 line


@triton.jit
def _prefetch_lines_kernel(ptr, n_lines, LINES_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    base = ptr.to(tl.pointer_type(tl.int8))
    first = tl.program_id(0) * LINES_PER_PROGRAM
    for i in range(0, LINES_PER_PROGRAM, BLOCK):
        lines = tl.minimum(first + i + tl.arange(0, BLOCK), n_lines - 1)
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
            [base + lines.to(tl.int64) * 128], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _touch_lines_kernel(ptr, sink_ptr, n_lines, LINES_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    base = ptr.to(tl.pointer_type(tl.int32))
    first = tl.program_id(0) * LINES_PER_PROGRAM
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, LINES_PER_PROGRAM, BLOCK):
        lines = tl.minimum(first + i + tl.arange(0, BLOCK), n_lines - 1)
        acc ^= tl.load(base + lines.to(tl.int64) * 32, eviction_policy="evict_last")
    # A store the compiler cannot prove dead, that (almost) never happens.
    total = tl.sum(acc, 0)
    tl.store(sink_ptr + tl.program_id(0), total, mask=total == 0x7F3A5C1E)


def l2_prefetch(t: torch.Tensor, max_bytes: int | None = None, mode: str = "prefetch",
                lines_per_program: int = 1024) -> None:
    """Ask L2 to fetch the first `max_bytes` (default all) of `t`'s storage. Contiguous from
    `t.data_ptr()`: for a row-major weight, its first rows; for a transposed view, its first
    columns' storage rows. A no-op on the CPU."""
    if t.device.type != "cuda":
        return
    n_bytes = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if max_bytes is not None:
        n_bytes = min(n_bytes, max_bytes)
    n_lines = n_bytes // LINE
    if n_lines <= 0:
        return
    grid = (triton.cdiv(n_lines, lines_per_program),)
    if mode == "prefetch":
        _prefetch_lines_kernel[grid](t, n_lines, LINES_PER_PROGRAM=lines_per_program, BLOCK=256, num_warps=4)
    elif mode == "load":
        sink = torch.empty(grid[0], dtype=torch.int32, device=t.device)
        _touch_lines_kernel[grid](t, sink, n_lines, LINES_PER_PROGRAM=lines_per_program, BLOCK=256, num_warps=4)
    else:
        raise ValueError(f"unknown prefetch mode {mode!r}")


def build_layer_weights():
    def w(n, k, col):
        t = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        return t.t().contiguous().t() if col else t
    return [dict(qkv=w(QKV, H, False), o=w(H, H, True), gate_up=w(2 * I, H, True), down=w(H, I, True),
                 n1=torch.ones(H, device="cuda", dtype=torch.bfloat16),
                 n2=torch.ones(H, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]


def run_layers(layers, x, cap_bytes: int, side: torch.cuda.Stream | None, join: bool, mode: str):
    residual = torch.zeros_like(x)
    main = torch.cuda.current_stream()

    def prefetch(weight):
        if side is None:
            return None
        side.wait_stream(main)
        with torch.cuda.stream(side):
            l2_prefetch(weight, cap_bytes, mode)
        return side

    pf = prefetch(layers[0]["qkv"])
    for li, lw in enumerate(layers):
        if pf is not None and join:
            main.wait_stream(pf)
        h, residual = ops.fused_add_rms_norm(x, residual, lw["n1"], 1e-5)
        qkv = F.linear(h, lw["qkv"])
        pf = prefetch(lw["o"])
        a = qkv[:, :H]
        for _ in range(4):  # RoPE, KV write, attention, split merge stand-ins
            a = a * 1.0001
        if pf is not None and join:
            main.wait_stream(pf)
        o = F.linear(a.contiguous(), lw["o"])
        h, residual = ops.fused_add_rms_norm(o, residual, lw["n2"], 1e-5)
        pf = prefetch(lw["gate_up"])
        if pf is not None and join:
            main.wait_stream(pf)
        gu = F.linear(h, lw["gate_up"])
        pf = prefetch(lw["down"])
        act = ops.silu_and_mul(gu)
        if pf is not None and join:
            main.wait_stream(pf)
        x = F.linear(act, lw["down"])
        pf = prefetch(layers[(li + 1) % len(layers)]["qkv"])  # overlaps the next add+RMSNorm
    if side is not None:
        main.wait_stream(side)
    return x


def time_variant(layers, cap_mb: float, join: bool, mode: str = "prefetch") -> float:
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream() if cap_mb > 0 else None
    cap = int(cap_mb * 2**20)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run_layers(layers, x, cap, side, join, mode)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_layers(layers, x, cap, side, join, mode)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / LAYERS


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    layers = build_layer_weights()
    rows = [{"variant": "no prefetch", "us_per_layer": time_variant(layers, 0, False)}]
    for mode in ("prefetch", "load"):
        for cap in (4, 8, 16, 24):
            for join in (False, True):
                rows.append({"variant": f"{mode} {cap} MB, {'join' if join else 'no join'}", "mode": mode,
                             "cap_mb": cap, "join": join, "us_per_layer": time_variant(layers, cap, join, mode)})
    rows.append({"variant": "no prefetch (again)", "us_per_layer": time_variant(layers, 0, False)})
    print("| variant | us per layer |")
    print("| --- | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['us_per_layer']:.1f} |")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
