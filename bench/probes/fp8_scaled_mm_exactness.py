"""Where the GPU's FP8 linear layer departs from its CPU oracle (`kernels.fp8.fp8_linear_ref` with
`quantize_input`): the per-token quantization of the activations (Triton on the GPU vs torch on
the CPU) and `torch._scaled_mm` itself, against the exactly rounded product of the very e4m3
operands the GPU used. A probe for understanding, not a benchmark of record; GPU only.

    python bench/probes/fp8_scaled_mm_exactness.py > bench/results/probes/fp8_scaled_mm_exactness_h100.txt

Per shape it prints the fraction of quantized activations that differ, the fraction of rows whose
scale differs (in the last bit: the division), and the fraction of `_scaled_mm` outputs that differ
from the oracle and from float64-then-bf16 of the same operands, with the largest relative gap."""
from __future__ import annotations

import torch

from tandem.kernels.fp8 import fp8_linear_ref, fp8_linear_scaled_mm, quantize_rows, quantize_rows_triton


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for rows, k, n in [(201, 64, 128), (201, 128, 64), (512, 4096, 4096)]:
        w = torch.randn(n, k)
        qw, sw = quantize_rows(w)
        x = torch.randn(rows, k)
        qx_cpu, sx_cpu = quantize_rows(x)
        qx_gpu, sx_gpu = quantize_rows_triton(x.cuda())
        q_diff = (qx_gpu.cpu().float() != qx_cpu.float()).float().mean().item()
        s_diff = (sx_gpu.cpu() != sx_cpu).float().mean().item()
        out = fp8_linear_scaled_mm(x.cuda(), qw.cuda(), sw.cuda()).cpu().float()
        oracle = fp8_linear_ref(x, qw, sw, k, quantize_input=True).float()
        exact = ((qx_gpu.cpu().double() * sx_gpu.cpu().double()) @ (qw.double() * sw.double()).t()
                 ).to(torch.bfloat16).float()
        ne_oracle = (out != oracle).float().mean().item()
        ne_exact = (out != exact).float().mean().item()
        rel = ((out - exact).abs() / exact.abs().clamp(min=1e-6)).max().item()
        print(f"rows {rows} k {k} n {n}: quantized x differs {q_diff:.2e} (scales {s_diff:.2e}); "
              f"_scaled_mm != CPU oracle {ne_oracle:.3f}, != exact-then-bf16 {ne_exact:.3f} (max rel {rel:.2e})")


if __name__ == "__main__":
    main()
