"""Batch-1 decode GEMMs of the Llama-3-8B shape, one at a time: which weight layout / BLAS
backend reads the weights fastest. A probe for choosing, not a benchmark of record.

    python bench/probes/gemv_probe.py          # on a GPU; prints a table, --json PATH to keep it

For each projection (N x K weight, M tokens) it times, with CUDA graphs of back-to-back calls
that cycle through enough weight copies (>= 256 MB) that every call reads its weight from HBM,
not from the 50 MB L2 (as in the model, where each layer has its own weights):
  linear    F.linear(x, W) with W [N, K] (what the model does today)
  t_major   x @ Wt with Wt = W.t().contiguous() [K, N]
  lt        F.linear with torch's cuBLASLt backend preferred
and reports microseconds per call and the weight-read bandwidth (bytes of W / time).

    python bench/probes/gemv_probe.py --split-k --m 128 256 512 --json PATH

times, instead, F.linear against split-K through a strided batched GEMM: K cut into S parts,
`torch.bmm` over the parts (no copies: strided views of x and W), the partial products summed.
At M = 256 the o_proj and down GEMMs give cuBLAS 64 output tiles of 128 x 128 for 132
multiprocessors (62-65% of max(bytes, FLOPs) in `gemv_probe_midm_h100.json`); S parts make S
times more tiles, at the cost of writing and summing S partial outputs.
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


def write_json(path: str | None, rows: list, **extra) -> None:
    """The probe's rows with the device and versions, if a path was given."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **extra, "rows": rows},
                      f, indent=1)


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """Enough random bf16 [N, K] weights (>= 256 MB, at least 2) that calls cycling through them
    read every weight from HBM, not from the 50 MB L2."""
    copies = max(2, -(-256 * 2**20 // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


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


def triton_sweep(json_path: str | None, ms: list[int]) -> int:
    """cuBLAS (row- and column-major weight) against kernels/gemv.py over its tile configs, for
    each M; the down projection with SiLU-and-mul fused into the GEMV's input (cuBLAS: the
    activation kernel + the GEMM)."""
    from tandem.kernels.activation import silu_and_mul
    from tandem.kernels.gemv import gemv

    if ms != [1]:
        raise SystemExit("--triton-sweep times kernels/gemv.py, which takes one row: pass --m 1")
    out = []
    for m in ms:
        cfgs = [(bn, bk, nw) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8)]
        for name, (n, k) in SHAPES.items():
            ws = weight_copies(n, k)
            copies = len(ws)
            wcs = [w.t().contiguous().t() for w in ws]  # column-major storage, same values
            silu = name == "down"
            x = torch.randn(m, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
            act = (lambda: silu_and_mul(x)) if silu else (lambda: x)
            res = {"m": m, "proj": name, "n": n, "k": k, "weight_copies": copies, "silu_mul_fused": silu}
            res["cublas_row_us"] = time_graph(lambda i: F.linear(act(), ws[i]), copies)
            res["cublas_col_us"] = time_graph(lambda i: F.linear(act(), wcs[i]), copies)
            ref = F.linear(act().float(), ws[0].float())
            sweep = []
            for cfg in cfgs:
                err = (gemv(x, ws[0], silu, tiles=cfg).float() - ref).abs().max().item()
                us = time_graph(lambda i: gemv(x, ws[i], silu, tiles=cfg), copies)
                sweep.append({"block_n": cfg[0], "block_k": cfg[1], "num_warps": cfg[2], "us": us, "max_err": err})
            res["triton_default_us"] = time_graph(lambda i: gemv(x, ws[i], silu), copies)
            res["triton_best"] = min(sweep, key=lambda c: c["us"])
            res["sweep"] = sweep
            out.append(res)
            del ws, wcs
    print("| M | proj | cuBLAS row us | cuBLAS col us | Triton default us | Triton best us (BLOCK_N, BLOCK_K, warps) | max err |")
    print("| ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for r in out:
        b = r["triton_best"]
        print(f"| {r['m']} | {r['proj']}{' +silu' if r['silu_mul_fused'] else ''} | {r['cublas_row_us']:.1f} | "
              f"{r['cublas_col_us']:.1f} | {r['triton_default_us']:.1f} | {b['us']:.1f} ({b['block_n']},{b['block_k']},{b['num_warps']}) | "
              f"{b['max_err']:.3g} |")
    write_json(json_path, out, triton=__import__("triton").__version__)
    return 0


def split_k(x: torch.Tensor, w: torch.Tensor, parts: int, fp32_partials: bool) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T as `parts` GEMMs over slices of K in one batched call, summed."""
    m, k = x.shape
    n = w.shape[0]
    xs = x.view(m, parts, k // parts).transpose(0, 1)  # [S, M, K/S], row stride K
    ws = w.view(n, parts, k // parts).transpose(0, 1).transpose(1, 2)  # [S, K/S, N], column stride K
    if fp32_partials:
        return torch.bmm(xs, ws, out_dtype=torch.float32).sum(0).to(x.dtype)
    return torch.bmm(xs, ws).sum(0)


def mid_m_cases(ms: list[int]):
    """For each M and each layer projection (the lm_head aside: mixed steps run it on the sampled
    rows only): the row of results so far (shape, F.linear's time), the weight copies, and an x."""
    for m in ms:
        for name in ("qkv", "o_proj", "down", "gate_up"):
            n, k = SHAPES[name]
            ws = weight_copies(n, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = {"m": m, "proj": name, "n": n, "k": k, "weight_copies": len(ws),
                   "linear_us": time_graph(lambda i: F.linear(x, ws[i]), len(ws))}
            yield res, ws, x


def split_k_sweep(json_path: str | None, ms: list[int]) -> int:
    rows = []
    for res, ws, x in mid_m_cases(ms):
        m, name, n, k, copies = res["m"], res["proj"], res["n"], res["k"], res["weight_copies"]
        exact = x.float() @ ws[0].float().t()
        res["linear_err"] = (F.linear(x, ws[0]).float() - exact).abs().max().item()
        ideal_us = max(n * k * 2 / 2.9e12, 2 * m * n * k / 750e12) * 1e6
        res["ideal_us_at_2.9TBs_750TFs"] = ideal_us
        for parts in (2, 4, 8):
            for fp32 in (True, False):
                key = f"s{parts}_{'f32' if fp32 else 'bf16'}"
                got = split_k(x, ws[0], parts, fp32)
                res[f"{key}_err"] = (got.float() - exact).abs().max().item()
                res[f"{key}_us"] = time_graph(lambda i, p=parts, f=fp32: split_k(x, ws[i], p, f), copies)
        rows.append(res)
        best = min((v, kk) for kk, v in res.items() if kk.endswith("_us") and kk.startswith("s"))
        print(f"M={m:4d} {name:8s} linear {res['linear_us']:6.1f} us (ideal {ideal_us:5.1f}); best split "
              f"{best[1]} {best[0]:6.1f} us; " + " ".join(
                  f"{kk[:-3]}={v:.1f}" for kk, v in res.items() if kk.endswith("_us") and kk.startswith("s")),
              flush=True)
        del ws
    write_json(json_path, rows, command="python bench/probes/gemv_probe.py --split-k --m " + " ".join(map(str, ms)))
    return 0


def triton_gemm_sweep(json_path: str | None, ms: list[int]) -> int:
    """cuBLAS's F.linear against a plain Triton GEMM (x [M, K] @ W[N, K]^T, W row-major, one
    output tile per program) over tile shapes: do smaller tiles than cuBLAS's 128 x 128 (more
    programs for 132 multiprocessors) pay at the mixed steps' M?"""
    import triton
    import triton.language as tl

    @triton.jit
    def gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            xt = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=offs_m[:, None] < M, other=0.0)
            wt = tl.load(w_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :], mask=offs_n[:, None] < N, other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    def gemm(x, w, cfg):
        bm, bn, bk, nw, ns = cfg
        m, k = x.shape
        n = w.shape[0]
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](x, w, y, m, n, k, BM=bm, BN=bn, BK=bk,
                                                               num_warps=nw, num_stages=ns)
        return y

    cfgs = [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 64, 4, 4),
            (128, 64, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (256, 64, 64, 8, 3),
            (256, 128, 64, 8, 3), (64, 256, 64, 8, 3), (32, 128, 128, 4, 4), (64, 64, 256, 4, 3)]
    rows = []
    for res, ws, x in mid_m_cases(ms):
        m, name, copies = res["m"], res["proj"], res["weight_copies"]
        base = F.linear(x, ws[0]).float()
        res["triton"] = {}
        for cfg in cfgs:
            try:
                err = (gemm(x, ws[0], cfg).float() - base).abs().max().item()
                us = time_graph(lambda i, c=cfg: gemm(x, ws[i], c), copies)
            except Exception as exc:  # noqa: BLE001 - a tile out of resources
                print(f"{name} {cfg}: {type(exc).__name__}", flush=True)
                continue
            res["triton"]["/".join(map(str, cfg))] = dict(us=us, max_abs_diff=err)
        best = min(res["triton"].items(), key=lambda kv: kv[1]["us"])
        print(f"M={m:4d} {name:8s} linear {res['linear_us']:6.1f} us; best Triton {best[0]} {best[1]['us']:6.1f} us "
              f"(diff {best[1]['max_abs_diff']:.3g})", flush=True)
        rows.append(res)
        del ws
    write_json(json_path, rows, command="python bench/probes/gemv_probe.py --triton-gemm --m " + " ".join(map(str, ms)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="*", default=[1, 8, 64, 8192])
    ap.add_argument("--json", default=None)
    ap.add_argument("--triton-sweep", action="store_true",
                    help="instead (with --m 1): time kernels/gemv.py over a grid of tile configs")
    ap.add_argument("--split-k", action="store_true",
                    help="instead: F.linear against split-K through torch.bmm over slices of K")
    ap.add_argument("--triton-gemm", action="store_true",
                    help="instead: F.linear against a plain Triton GEMM over tile shapes")
    args = ap.parse_args()
    if args.triton_gemm:
        return triton_gemm_sweep(args.json, args.m)
    if args.split_k:
        return split_k_sweep(args.json, args.m)
    if args.triton_sweep:
        return triton_sweep(args.json, args.m)
    rows = []
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            ws = weight_copies(n, k)
            copies = len(ws)
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
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
