"""How fast can this GPU *read* memory, against the device copy the engine benchmark measures?

The engine benchmark's rooflines and its throughput bound (`bench/throughput_bound.py`) use the copy
rate (bytes read + written per second). Decode steps mostly read (weights, KV). If a read-only
stream were much faster than a copy, those bounds would be too loose. A probe, not a benchmark:

    python bench/probes/read_bandwidth_probe.py --out /tmp/read

Each row: a method, a buffer size, GB/s (bytes that method moves per second, median of 20 calls,
CUDA-event timed).
- copy: `dst.copy_(src)`, bytes read + written (the engine benchmark's figure);
- triton read: each program streams its share of the buffer and writes one float;
- torch sum: `x.sum()` over the buffer, bytes read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Program p reads ITERS consecutive blocks; the sum keeps the loads from being removed.
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def triton_read(x: torch.Tensor, block: int = 4096, iters: int = 16) -> torch.Tensor:
    n = x.numel()
    grid = (triton.cdiv(n, block * iters),)
    out = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    _read_kernel[grid](x, out, n, BLOCK=block, ITERS=iters, num_warps=8)
    return out


def event_median_s(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/read")
    args = ap.parse_args()
    rows = []
    for gib in (1, 4):
        x = torch.randn(gib << 28, device="cuda")  # float32: gib GiB
        y = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        ref = x.double().sum().item()
        got = triton_read(x).double().sum().item()
        assert abs(got - ref) <= 1e-3 * max(1.0, abs(ref)) + 1.0, (got, ref)  # every element was read
        for method, fn, moved in (("copy", lambda: y.copy_(x), 2 * nbytes),
                                  ("triton read", lambda: triton_read(x), nbytes),
                                  ("torch sum", lambda: x.sum(), nbytes)):
            s = event_median_s(fn)
            rows.append(dict(method=method, gib=gib, gb_s=moved / s / 1e9))
            print(f"{method:12s} {gib} GiB: {rows[-1]['gb_s']:.0f} GB/s", flush=True)
        del x, y
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read_bandwidth.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "command": "python bench/probes/read_bandwidth_probe.py", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
