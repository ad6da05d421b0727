"""FP8 (e4m3) against bf16 GEMMs at the Llama-3-8B projections: which path an FP8 linear layer
should take at decode (M = 1..8) and prefill (M = 4096) shapes. A probe for choosing, not a
benchmark of record.

    python bench/probes/fp8_gemm_probe.py --out bench/results/probes/fp8_gemm_probe_h100.json   # GPU
    python bench/probes/fp8_gemm_probe.py --device cpu --out /tmp/fp8_gemm_probe_cpu.json       # smoke run

Per projection (N x K weight) and M it times, with CUDA graphs of back-to-back calls cycling
through enough weight copies (>= 256 MB) that each call reads its weight from HBM
(`gemv_probe.time_graph`):
  bf16_linear      F.linear(x, W) in bf16 (cuBLAS): what the bf16 model runs at M >= 2
  fp8_scaled_mm    torch._scaled_mm on e4m3 x and W, row-wise scales: the GEMM alone
  fp8_linear       kernels.fp8.fp8_linear_scaled_mm: x quantized per token, then the GEMM (the layer)
  fp8_triton_gemm  kernels.fp8.fp8_weight_gemm: bf16 x, the e4m3 weight dequantized in registers (the
                   path of block-wise checkpoints), here with per-channel and with 128-wide block scales
  bf16_gemv        kernels/gemv.py on bf16 W (M = 1: the bf16 model's batch-1 path)
  fp8_gemv         kernels/gemv.py on e4m3 W with per-channel scales (M = 1), default tiles and a
                   small tile sweep
with each time's weight-read rate (bytes of W / time; e4m3 W is half the bytes) and, at
M >= 1024, TFLOP/s. Each path's error against the dequantize-then-matmul reference is recorded.
On the CPU (`--device cpu`) the shapes are cut down, timings are wall clock, the GEMV runs in
the Triton interpreter and `_scaled_mm` is skipped: it checks the script, not the speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() or ("--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: the CPU smoke run
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import SHAPES, time_graph  # noqa: E402  (a sibling probe, run from its folder)

from tandem.kernels.fp8 import (fp8_linear_ref, fp8_linear_scaled_mm, fp8_weight_gemm,  # noqa: E402
                                quantize_rows, scaled_mm_supported)

GEMV_TILES = [(4, 1024, 4), (8, 1024, 4), (8, 2048, 8), (16, 512, 4), (16, 1024, 8), (32, 512, 8)]


def copies_for(bytes_each: int, gpu: bool) -> int:
    return max(2, -(-256 * 2**20 // bytes_each)) if gpu else 2


def wall_us(fn, copies: int, reps: int = 3) -> float:
    fn(0)
    t = time.perf_counter()
    for i in range(reps):
        fn(i % copies)
    return (time.perf_counter() - t) / reps * 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def probe_one(name: str, n: int, k: int, m: int, dev: torch.device, tiles: bool) -> dict:
    from tandem.kernels.gemv import gemv

    gpu = dev.type == "cuda"
    timer = time_graph if gpu else wall_us
    w_bf16 = [torch.randn(n, k, device=dev) * 0.02 for _ in range(copies_for(n * k * 2, gpu))]
    w_bf16 = [w.to(torch.bfloat16) for w in w_bf16]
    q = [quantize_rows(w) for w in w_bf16[: copies_for(n * k, gpu)]]
    w8, s8 = [a for a, _ in q], [b for _, b in q]
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    row = {"proj": name, "n": n, "k": k, "m": m, "bf16_copies": len(w_bf16), "fp8_copies": len(w8)}
    ref = fp8_linear_ref(x, w8[0], s8[0], k, quantize_input=True)
    exact = fp8_linear_ref(x.float(), w8[0], s8[0], k)
    row["bf16_linear_us"] = timer(lambda i: F.linear(x, w_bf16[i]), len(w_bf16))
    if gpu and scaled_mm_supported(dev):
        xq, xs = quantize_rows(x)
        row["fp8_scaled_mm_us"] = timer(lambda i: torch._scaled_mm(xq, w8[i].t(), scale_a=xs, scale_b=s8[i].reshape(1, -1),
                                                                   out_dtype=torch.bfloat16), len(w8))
        row["fp8_linear_us"] = timer(lambda i: fp8_linear_scaled_mm(x, w8[i], s8[i]), len(w8))
        row["fp8_linear_rel_err"] = rel_err(fp8_linear_scaled_mm(x, w8[0], s8[0]), ref)
    row["fp8_triton_gemm_us"] = timer(lambda i: fp8_weight_gemm(x, w8[i], s8[i], k), len(w8))
    row["fp8_triton_gemm_rel_err"] = rel_err(fp8_weight_gemm(x, w8[0], s8[0], k), exact)
    if k % 128 == 0:  # the same weights with one scale per 128 columns (a block-wise checkpoint's layout)
        blocks = [s.expand(n, k // 128).contiguous() for s in s8]
        row["fp8_triton_gemm_block128_us"] = timer(lambda i: fp8_weight_gemm(x, w8[i], blocks[i], 128), len(w8))
    if m == 1:
        row["bf16_gemv_us"] = timer(lambda i: gemv(x, w_bf16[i]), len(w_bf16))
        row["fp8_gemv_us"] = timer(lambda i: gemv(x, w8[i], weight_scale=s8[i], group_k=k), len(w8))
        row["fp8_gemv_rel_err"] = rel_err(gemv(x, w8[0], weight_scale=s8[0], group_k=k), exact)
        if tiles:
            sweep = []
            for cfg in GEMV_TILES:
                try:
                    us = timer(lambda i, c=cfg: gemv(x, w8[i], weight_scale=s8[i], group_k=k, tiles=c), len(w8))
                except Exception as exc:  # noqa: BLE001 - a tile out of resources
                    sweep.append({"tiles": cfg, "error": type(exc).__name__})
                    continue
                sweep.append({"tiles": cfg, "us": us})
            row["fp8_gemv_sweep"] = sweep
    for key in [k_ for k_ in row if k_.endswith("_us")]:
        weight_bytes = n * k * (2 if key.startswith("bf16") else 1)
        row[key.removesuffix("_us") + "_weight_tb_s"] = weight_bytes / (row[key] * 1e-6) / 1e12
        if m >= 1024:
            row[key.removesuffix("_us") + "_tflops"] = 2 * m * n * k / (row[key] * 1e-6) / 1e12
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, nargs="*", default=None, help="rows (default: 1 2 4 8 4096; CPU: 1 4)")
    ap.add_argument("--no-tile-sweep", action="store_true", help="skip the FP8 GEMV tile sweep at M = 1")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    shapes = SHAPES if gpu else {name: (max(16, n // 256), max(32, k // 128)) for name, (n, k) in SHAPES.items()}
    ms = args.m or ([1, 2, 4, 8, 4096] if gpu else [1, 4])
    rows = []
    for m in ms:
        for name, (n, k) in shapes.items():
            if name == "lm_head" and m > 8:
                continue  # the LM head runs on the sampled rows only, and stays bf16
            rows.append(probe_one(name, n, k, m, dev, tiles=not args.no_tile_sweep))
            r = rows[-1]
            print(f"M={m:5d} {name:8s} bf16 {r['bf16_linear_us']:9.1f} us"
                  + (f" | scaled_mm {r['fp8_scaled_mm_us']:9.1f} | fp8 layer {r['fp8_linear_us']:9.1f}"
                     if "fp8_scaled_mm_us" in r else "")
                  + f" | triton w8 {r['fp8_triton_gemm_us']:9.1f}"
                  + (f" | gemv bf16 {r['bf16_gemv_us']:8.1f} fp8 {r['fp8_gemv_us']:8.1f}" if m == 1 else ""),
                  flush=True)
    result = {
        "device": torch.cuda.get_device_name(dev) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "command": "python bench/probes/fp8_gemm_probe.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
