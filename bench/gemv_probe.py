"""Batch-1 decode GEMMs of the Llama-3-8B shape, one at a time: which weight layout / BLAS
backend reads the weights fastest. A probe for choosing, not a benchmark of record.

    python bench/gemv_probe.py          # on a GPU; prints a table, --json PATH to keep it

For each projection (N x K weight, M tokens) it times, with CUDA graphs of back-to-back calls
that cycle through enough weight copies (>= 256 MB) that every call reads its weight from HBM,
not from the 50 MB L2 (as in the model, where each layer has its own weights):
  linear    F.linear(x, W) with W [N, K] (what the model does today)
  t_major   x @ Wt with Wt = W.t().contiguous() [K, N]
  lt        F.linear with torch's cuBLASLt backend preferred
and reports microseconds per call and the weight-read bandwidth (bytes of W / time).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # name: (N, K) for Llama-3-8B; M = tokens in the step
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def time_graph(fn, copies: int, reps: int = 48) -> float:
    """Microseconds per call, from a CUDA graph of `reps` calls (call i uses copy i % copies)
    replayed 5 times."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[1, 8, 64, 8192])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            copies = max(2, -(-256 * 2**20 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            wts = [w.t().contiguous() for w in ws]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = {"m": m, "proj": name, "n": n, "k": k, "weight_copies": copies}
            res["linear_us"] = time_graph(lambda i: F.linear(x, ws[i]), copies)
            res["t_major_us"] = time_graph(lambda i: x @ wts[i], copies)
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                res["lt_us"] = time_graph(lambda i: F.linear(x, ws[i]), copies)
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            w = ws[0]
            gb = w.numel() * 2 / 1e9
            for key in ("linear", "t_major", "lt"):
                res[f"{key}_tb_s"] = gb / (res[f"{key}_us"] * 1e-6) / 1e3
            if m >= 1024:  # compute-bound: report TFLOP/s instead
                for key in ("linear", "t_major", "lt"):
                    res[f"{key}_tflops"] = 2 * m * n * k / (res[f"{key}_us"] * 1e-6) / 1e12
            rows.append(res)
            del w, ws, wts
    print("| M | proj | linear us | x @ W^T-major us | cuBLASLt us | (weight TB/s, or TFLOP/s at M >= 1024) |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        unit = "tflops" if r["m"] >= 1024 else "tb_s"
        rates = " / ".join(f"{r[f'{key}_{unit}']:.2f}" for key in ("linear", "t_major", "lt"))
        print(f"| {r['m']} | {r['proj']} | {r['linear_us']:.1f} | {r['t_major_us']:.1f} | {r['lt_us']:.1f} | {rates} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
