"""Offline throughput shaped like `vllm bench throughput` / `trtllm-bench throughput`: fixed input
and output lengths (NVIDIA's published table for Llama-3.1-8B on one H100 uses these), plus a
ShareGPT-shaped length mix; EOS ignored, every request queued at once, the engine's own memory
planning with nothing else resident (random weights made on the device as they load,
`bench/random_weights.py`). Each workload's figure has its bound beside it
(`bench/throughput_bound.py`, with the KV-capacity and max_num_seqs limits of this engine's pool).

One run measures one configuration (KV cache dtype, weight quantization) and writes
`throughput_<kv>_<quant>_<device>.json`; `--combine BF16.json FP8.json` writes the FP8 results
contract `fp8_<device>.json` (+ `.md`) from two runs, against TensorRT-LLM's FP8 figures:

    python bench/throughput_bench.py --device cuda --out $OUT/tp                       # bf16
    python bench/throughput_bench.py --device cuda --out $OUT/tp --kv-cache-dtype fp8  # FP8 KV
    python bench/throughput_bench.py --combine $OUT/tp/throughput_auto_none_*.json \\
        $OUT/tp/throughput_fp8_none_*.json --out bench/results
    python bench/throughput_bench.py --device cpu --out /tmp/tp   # a tiny smoke run

`--quantization fp8` (FP8 weights) is passed to the engine where `EngineConfig` has that field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem import LLM, SamplingParams
from tandem.bench.engine_bench import (
    CONFIG_8B, device_tag, measure_copy_bandwidth, measure_decode_b1, measure_matmul, sync, weight_bytes,
)
from tandem.bench.random_weights import random_model_folder, random_weights
from tandem.bench.throughput_bound import ModelShape, WorkloadCounts, throughput_bound
from tandem.bench.workload import fixed_workload, sharegpt_shaped_workload
from tandem.engine.config import EngineConfig

# TensorRT-LLM's published FP8 output tok/s for Llama-3.1-8B on one H100 SXM (TP1), ISL/OSL ->
# figure: docs/source/performance/perf-overview.md of NVIDIA/TensorRT-LLM ("Llama 3.1 8B" table).
TRTLLM_FP8_H100 = {(128, 128): 28312, (1000, 1000): 15220, (2048, 128): 3450, (500, 2000): 17660,
                   (2048, 2048): 9305}
TRTLLM_SOURCE = ("NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md, Llama 3.1 8B, H100 TP1 (FP8); "
                 "requests per workload there: 30000 (128/128), 3000 (1000/1000, 2048/128, 500/2000), 1500 (2048/2048)")


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int | None = None  # None: ShareGPT-shaped lengths
    output_len: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "Workload":
        """ISLxOSLxN (fixed lengths) or sharegpt:N."""
        try:
            if spec.startswith("sharegpt:"):
                return cls("sharegpt", int(spec.split(":", 1)[1]))
            isl, osl, n = (int(x) for x in spec.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ISLxOSLxN or sharegpt:N, got {spec!r}") from None
        if min(isl, osl, n) < 1:
            raise argparse.ArgumentTypeError(f"lengths and counts must be >= 1: {spec!r}")
        return cls(f"{isl}/{osl}", n, isl, osl)

    def requests(self, vocab: int, scale: float) -> tuple[list[list[int]], list[int]]:
        if self.input_len is None:
            return sharegpt_shaped_workload(self.num_prompts, vocab, seed=0, scale=scale)
        return fixed_workload(self.num_prompts, self.input_len, self.output_len, vocab, seed=0)


# Sized so that one configuration's whole run fits a 10-minute command on one H100 (fewer requests
# than NVIDIA's table uses: see TRTLLM_SOURCE; the bound counts the same requests as the run).
GPU_WORKLOADS = "128x128x2000,1000x1000x500,2048x128x500,500x2000x300,2048x2048x200,sharegpt:1000"
CPU_WORKLOADS = "16x16x8,32x32x4,64x8x4,16x64x4,sharegpt:8"
CPU_SHAREGPT_SCALE = 0.1
B1_PROMPT = 128  # the batch-1 decode measurement's prompt, as bench/engine_bench.py's


def measure_fp8_matmul(device: str) -> float | None:
    """FP8 (e4m3) matmul rate through torch._scaled_mm (cuBLASLt), FLOP/s; None where unavailable."""
    if not device.startswith("cuda") or not hasattr(torch, "_scaled_mm"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device=device)
    try:
        for _ in range(3):
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        sync(device)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            sync(device)
            times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - no FP8 GEMM on this GPU, build or torch signature
        print(f"FP8 matmul not measured: {e}", flush=True)
        return None
    return 2 * n**3 / sorted(times)[len(times) // 2]


def engine_kwargs(args, max_model_len: int) -> dict:
    kwargs = dict(dtype="bfloat16" if args.device.startswith("cuda") else "float32",
                  kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_batched_tokens, max_model_len=max_model_len,
                  scheduling_policy=args.scheduling_policy, gpu_memory_utilization=args.gpu_memory_utilization)
    if args.quantization:
        if "quantization" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise SystemExit("--quantization: this engine's EngineConfig has no `quantization` field yet")
        kwargs["quantization"] = args.quantization
    return kwargs


def is_fp8_weights(model: torch.nn.Module) -> bool:
    return any(p.element_size() == 1 and p.dim() == 2 for p in model.parameters())


def run(args) -> dict:
    gpu = args.device.startswith("cuda")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    try:
        workloads = [Workload.parse(s) for s in (args.workloads or (GPU_WORKLOADS if gpu else CPU_WORKLOADS)).split(",")]
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--workloads: {e}") from None
    if args.num_prompts:
        workloads = [dataclasses.replace(w, num_prompts=args.num_prompts) for w in workloads]
    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python bench/throughput_bench.py " + " ".join(sys.argv[1:]),
        "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization, "gpu": gpu,
    }
    try:
        import triton
        import transformers

        results["triton"], results["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput_{args.kv_cache_dtype}_{args.quantization or 'none'}_{device_tag(results['device'], gpu)}"
    path = out / f"{name}.json"

    def checkpoint() -> None:  # a run cut short keeps what it measured
        path.write_text(json.dumps(results, indent=2) + "\n")

    results["copy_bandwidth_gb_s"] = measure_copy_bandwidth(args.device) / 1e9
    results["matmul_tflops"] = measure_matmul(args.device, torch.bfloat16 if gpu else torch.float32) / 1e12
    fp8_mm = measure_fp8_matmul(args.device)
    results["fp8_matmul_tflops"] = fp8_mm / 1e12 if fp8_mm else None
    log(f"copy {results['copy_bandwidth_gb_s']:.0f} GB/s, matmul {results['matmul_tflops']:.0f} TFLOP/s, "
        f"fp8 matmul {results['fp8_matmul_tflops']}")

    scale = 1.0 if gpu else CPU_SHAREGPT_SCALE
    tmp = Path(tempfile.mkdtemp(prefix="tandem-tp-"))
    if gpu:
        folder = random_model_folder(tmp / "llama3-8b-random", CONFIG_8B)
    else:
        from tandem.engine.make_model import make_model

        folder = make_model(tmp / "tiny-llama", "llama", seed=0)
    cfg = json.loads((folder / "config.json").read_text())
    requests = {w.name: w.requests(cfg["vocab_size"], scale) for w in workloads}
    longest = max(len(p) + o for prompts, outs in requests.values() for p, o in zip(prompts, outs))
    max_model_len = -(-max(longest, B1_PROMPT + args.b1_tokens) // 16) * 16
    dtype = torch.bfloat16 if gpu else torch.float32

    t0 = time.perf_counter()
    llm = LLM(str(folder), device=args.device, weights=random_weights(folder, args.device, dtype),
              **engine_kwargs(args, max_model_len))
    engine = llm.engine
    runner = engine.runner
    results["engine_start_s"] = time.perf_counter() - t0
    results["engine"] = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                             max_model_len=max_model_len, scheduling_policy=args.scheduling_policy,
                             gpu_memory_utilization=args.gpu_memory_utilization, block_size=engine.config.block_size)
    results["num_kv_blocks"] = engine.block_manager.num_blocks
    results["kv_pool_tokens"] = engine.block_manager.num_blocks * engine.config.block_size
    results["memory_plan"] = runner.memory_plan.as_dict() if runner.memory_plan else None
    if runner.memory_plan:
        log("memory plan:\n" + runner.memory_plan.describe())
    fp8_weights = is_fp8_weights(runner.model)
    results["weights_dtype"] = "float8_e4m3fn" if fp8_weights else str(dtype).removeprefix("torch.")
    results["weight_bytes"] = weight_bytes(runner.model)
    kv_bytes = runner.kv_cache.element_size()
    shape = ModelShape.from_config(cfg, 1 if fp8_weights else dtype.itemsize, kv_bytes)
    results["kv_bytes_per_token"] = shape.kv_bytes_per_token
    log(f"engine up in {results['engine_start_s']:.1f}s: {results['num_kv_blocks']} KV blocks "
        f"({results['kv_pool_tokens']} tokens), KV {runner.kv_cache.dtype}, weights {results['weights_dtype']}")
    checkpoint()

    # Batch-1 decode (context 128-384), against its roofline and the FP8 roofline (all bytes halved
    # from bf16: FP8 weights and an FP8 cache).
    rng = random.Random(1)
    decode_s = measure_decode_b1(engine, [rng.randrange(10, cfg["vocab_size"] - 10) for _ in range(B1_PROMPT)],
                                 args.device, args.b1_tokens)
    bf16_shape = ModelShape.from_config(cfg, 2)
    median_context = B1_PROMPT + args.b1_tokens // 2
    fp8_bytes = bf16_shape.step_weight_bytes // 2 + bf16_shape.kv_bytes_per_token // 2 * median_context
    own_bytes = results["weight_bytes"] + shape.kv_bytes_per_token * median_context
    bw = results["copy_bandwidth_gb_s"] * 1e9
    results.update(decode_b1_ms=decode_s * 1e3, decode_b1_roofline_ms=own_bytes / bw * 1e3,
                   decode_b1_roofline_fraction=own_bytes / bw / decode_s,
                   decode_b1_fp8_roofline_ms=fp8_bytes / bw * 1e3,
                   decode_b1_fp8_roofline_fraction=fp8_bytes / bw / decode_s)
    log(f"decode b1 {decode_s * 1e3:.2f} ms: {results['decode_b1_roofline_fraction']:.1%} of its roofline, "
        f"{results['decode_b1_fp8_roofline_fraction']:.1%} of the FP8 roofline")
    checkpoint()

    rate = results["fp8_matmul_tflops"] if fp8_weights and results["fp8_matmul_tflops"] else results["matmul_tflops"]
    results["workloads"] = []
    for w in workloads:
        prompts, outs = requests[w.name]
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True, detokenize=False) for o in outs]
        engine.block_manager.reset_prefix_cache()
        sync(args.device)
        t = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        sync(args.device)
        elapsed = time.perf_counter() - t
        got = sum(len(o.outputs[0].token_ids) for o in res)
        assert got == sum(outs), (w.name, got, sum(outs))
        counts = WorkloadCounts.of([len(p) for p in prompts], outs, max_num_seqs=args.max_num_seqs,
                                   kv_pool_tokens=results["kv_pool_tokens"], block_size=engine.config.block_size)
        bound = throughput_bound(shape, counts, results["copy_bandwidth_gb_s"], rate)
        row = dict(name=w.name, isl=w.input_len, osl=w.output_len, num_prompts=len(prompts),
                   prompt_tokens=sum(map(len, prompts)), output_tokens=got, seconds=elapsed,
                   out_tok_s=got / elapsed, total_tok_s=(got + sum(map(len, prompts))) / elapsed,
                   bound=bound, fraction_of_bound=got / elapsed / bound["output_tok_s"])
        results["workloads"].append(row)
        checkpoint()
        log(f"{w.name} x {len(prompts)}: {row['out_tok_s']:.0f} output tok/s ({elapsed:.1f}s), bound "
            f"{bound['output_tok_s']:.0f} ({bound['bound_by']}, steps by {counts.min_steps_by}) -> "
            f"{row['fraction_of_bound']:.1%}")
    checkpoint()
    log(f"wrote {path}")
    return results


# ------------------------------------------------------------------------------ the contract

def combine(bf16_path: Path, fp8_path: Path, out: Path) -> dict:
    """fp8_<device>.json: the issue's results contract from a bf16 run and an FP8 run."""
    bf16, fp8 = json.loads(bf16_path.read_text()), json.loads(fp8_path.read_text())
    if bf16["device"] != fp8["device"]:
        raise SystemExit(f"the runs are on different devices: {bf16['device']!r} vs {fp8['device']!r}")
    if bf16["kv_cache_dtype"] != "auto" or bf16.get("quantization"):
        raise SystemExit(f"{bf16_path}: not a bf16 run (kv {bf16['kv_cache_dtype']}, quantization {bf16.get('quantization')})")
    by_name = {r["name"]: r for r in fp8.get("workloads", [])}
    rows, details = [], []
    for b in bf16.get("workloads", []):
        f = by_name.get(b["name"])
        if f is not None and (f["num_prompts"], f["prompt_tokens"], f["output_tokens"]) != (
                b["num_prompts"], b["prompt_tokens"], b["output_tokens"]):
            raise SystemExit(f"workload {b['name']}: the two runs ran different requests")
        details.append(dict(name=b["name"], bf16=_brief(b), fp8=_brief(f) if f else None))
        if b["isl"] is None:
            continue  # ShareGPT-shaped: no published fixed-length figure; in details only
        trt = TRTLLM_FP8_H100.get((b["isl"], b["osl"])) if "H100" in bf16["device"] else None
        fp8_tok_s = f["out_tok_s"] if f else None
        rows.append({"isl": b["isl"], "osl": b["osl"], "num_prompts": b["num_prompts"],
                     "bf16_out_tok_s": b["out_tok_s"], "fp8_out_tok_s": fp8_tok_s,
                     "bound_out_tok_s": b["bound"]["output_tok_s"], "trtllm_fp8_out_tok_s": trt,
                     "fp8_fraction_of_trtllm": fp8_tok_s / trt if fp8_tok_s and trt else None,
                     "bf16_fraction_of_bound": b["fraction_of_bound"]})
    result = {
        "device": fp8["device"],
        "decode_b1_ms": fp8.get("decode_b1_ms"),
        "decode_b1_fp8_roofline_fraction": fp8.get("decode_b1_fp8_roofline_fraction"),
        "workloads": rows,
        "details": {
            "meaning": ("bound_out_tok_s and bf16_fraction_of_bound: the bf16 run against its own bound "
                        "(bench/throughput_bound.py with this engine's max_num_seqs and KV pool); "
                        "decode_b1_fp8_roofline_fraction: the FP8 run's batch-1 decode against the roofline with "
                        "weights and KV at one byte per element, whatever the run's weights were"),
            "trtllm_source": TRTLLM_SOURCE,
            "fp8_run": _run_summary(fp8, fp8_path), "bf16_run": _run_summary(bf16, bf16_path),
            "workloads": details,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    name = f"fp8_{device_tag(result['device'], fp8.get('gpu', True))}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(report(result) + "\n")
    print(report(result))
    return result


def _brief(row: dict) -> dict:
    return dict(out_tok_s=row["out_tok_s"], seconds=row["seconds"], bound_out_tok_s=row["bound"]["output_tok_s"],
                bound_by=row["bound"]["bound_by"], min_steps=row["bound"]["counts"]["min_steps"],
                min_steps_by=row["bound"]["counts"]["min_steps_by"], fraction_of_bound=row["fraction_of_bound"])


def _run_summary(run: dict, path: Path) -> dict:
    keys = ("command", "torch", "triton", "transformers", "kv_cache_dtype", "quantization", "weights_dtype",
            "copy_bandwidth_gb_s", "matmul_tflops", "fp8_matmul_tflops", "engine", "num_kv_blocks", "kv_pool_tokens",
            "memory_plan", "decode_b1_ms", "decode_b1_roofline_fraction", "decode_b1_fp8_roofline_ms")
    return dict({k: run.get(k) for k in keys}, file=path.name)


def report(result: dict) -> str:
    def f(v, fmt="{:.0f}"):
        return "n/a" if v is None else fmt.format(v)

    d = result["details"]
    lines = [f"# FP8 throughput on {result['device']}", "",
             f"bf16: `{d['bf16_run']['command']}`; FP8: `{d['fp8_run']['command']}` "
             f"(KV {d['fp8_run']['kv_cache_dtype']}, weights {d['fp8_run']['weights_dtype']}).", "",
             f"Batch-1 decode (FP8 run): {f(result['decode_b1_ms'], '{:.2f}')} ms/token, "
             f"{f(result['decode_b1_fp8_roofline_fraction'], '{:.1%}')} of the FP8 roofline (target >= 85%).", "",
             "| ISL/OSL | requests | bf16 out tok/s | bound | bf16 / bound (target 75%) | FP8 out tok/s | "
             "TRT-LLM FP8 | FP8 / TRT-LLM (target 70%) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["workloads"]:
        lines.append(f"| {r['isl']}/{r['osl']} | {r['num_prompts']} | {f(r['bf16_out_tok_s'])} | {f(r['bound_out_tok_s'])} | "
                     f"{f(r['bf16_fraction_of_bound'], '{:.1%}')} | {f(r['fp8_out_tok_s'])} | {f(r['trtllm_fp8_out_tok_s'])} | "
                     f"{f(r['fp8_fraction_of_trtllm'], '{:.1%}')} |")
    for w in d["workloads"]:
        if w["name"] == "sharegpt":
            lines += ["", f"ShareGPT-shaped lengths: bf16 {f(w['bf16']['out_tok_s'])} output tok/s "
                          f"({f(w['bf16']['fraction_of_bound'], '{:.1%}')} of its bound), FP8 "
                          f"{f(w['fp8']['out_tok_s'] if w['fp8'] else None)}."]
    lines += ["", f"KV pool: bf16 {d['bf16_run']['num_kv_blocks']} blocks, FP8 {d['fp8_run']['num_kv_blocks']} blocks.",
              f"TensorRT-LLM figures: {d['trtllm_source']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--kv-cache-dtype", default="auto", help="EngineConfig.kv_cache_dtype: auto or fp8")
    ap.add_argument("--quantization", default=None, help="weight quantization (e.g. fp8), where the engine has it")
    ap.add_argument("--workloads", default=None,
                    help=f"comma-separated ISLxOSLxN or sharegpt:N (default on GPU: {GPU_WORKLOADS}; on CPU: {CPU_WORKLOADS})")
    ap.add_argument("--num-prompts", type=int, default=None, help="override every workload's request count")
    ap.add_argument("--b1-tokens", type=int, default=257, help="decode steps timed at batch 1")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "lof"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--combine", nargs=2, type=Path, metavar=("BF16_JSON", "FP8_JSON"),
                    help="write fp8_<device>.json (the results contract) from a bf16 and an FP8 run, then exit")
    args = ap.parse_args(argv)
    if args.combine:
        combine(*args.combine, Path(args.out))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
