"""Offline engine benchmark: Tandem vs HF transformers on the same random weights, one device.

    python bench/engine_bench.py --device cuda --out bench/results   # Llama-3-8B shape, bf16
    python bench/engine_bench.py --device cpu  --out bench/results   # small random model, fp32

Measures (each figure's meaning is written into the markdown report):
  1. batch-1 decode ms/token vs the roofline (weight + KV bytes / device copy bandwidth measured here);
  2. prefill of a 4k prompt in TFLOP/s vs the bf16 matmul rate measured here (GPU only);
  3. offline throughput on a mixed workload (prompts uniform in [lo, hi] tokens, outputs exponential,
     EOS ignored), counting only requested output tokens: Tandem, HF static batching (`generate`,
     fixed batches, left-padded), and HF continuous batching (its manager, each request with its own
     output length).
HF continuous batching runs the whole workload. HF static runs a prefix of it by default (two
batches on the GPU); the whole workload's static batching takes ~4.5 minutes on an H100, so the
committed run takes it from an earlier `--hf-only --hf-static-requests 256` run (`--hf-static-from`).
The first 64 requests flattered Tandem ~1.55x on the H100 (bench/results). The report says how many
requests each system ran. `--trace-steps` records every throughput step (bench/step_trace.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from tandem.bench.step_trace import StepTracer
from tandem.bench.workload import make_workload
from tandem.bench.throughput_bound import ModelShape, WorkloadCounts, run_figures, throughput_bound
from tandem import LLM, SamplingParams

CONFIG_8B = Path(__file__).parent / "configs" / "llama3_8b.json"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / sorted(times)[len(times) // 2]


def measure_matmul(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _time_flops(lambda: a @ b, 2 * n**3, device)


def measure_fp8_matmul(device: str) -> float | None:
    """The square e4m3 GEMM rate (`torch._scaled_mm`, row-wise scales, bf16 out), as the FP8
    linear layers run it; None where the device has no FP8 GEMM."""
    from tandem.kernels.fp8 import FP8_DTYPE, scaled_mm_supported

    if not scaled_mm_supported(torch.device(device)):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(FP8_DTYPE)
    b = torch.randn(n, n, device=device).to(FP8_DTYPE).t()  # column-major, as _scaled_mm wants it
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    return _time_flops(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                       2 * n**3, device)


def _time_flops(fn, flops: int, device: str) -> float:
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return flops / sorted(times)[len(times) // 2]


def hf_static(model, prompts, outs, batch: int, device: str, pad_id: int) -> tuple[float, int]:
    """HF `generate` in fixed batches (left-padded); counts only the requested tokens."""
    total_tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i : i + batch], outs[i : i + batch]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for j, p in enumerate(ps):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(os_),
                           min_new_tokens=max(os_), do_sample=False, pad_token_id=pad_id)
        total_tokens += sum(os_)
    sync(device)
    return total_tokens / (time.perf_counter() - t0), len(prompts)


def hf_continuous(model, prompts, outs, device: str, pad_id: int) -> tuple[float, int, str]:
    """HF continuous batching on the same workload: each request asks for its own number of
    tokens through the manager's `add_request(max_new_tokens=...)`, EOS disabled; counts the
    generated tokens. Falls back to `generate_batch` (one max_new_tokens for all: the workload's
    mean) where this transformers version lacks the manager API; the returned mode says which."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(outs), do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    manager_cm = getattr(model, "continuous_batching_context_manager", None)
    if manager_cm is not None:
        try:
            return _hf_continuous_manager(manager_cm, cfg, prompts, outs, device)
        except Exception as e:  # noqa: BLE001 - an API difference in this transformers version
            print(f"HF continuous batching manager failed ({e!r}); falling back to generate_batch", flush=True)
    mean_out = max(1, round(sum(outs) / len(outs)))
    cfg.max_new_tokens = mean_out
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=cfg)  # manages its own no-grad
    sync(device)
    elapsed = time.perf_counter() - t0
    generated = sum(len(r.generated_tokens) for r in results.values())
    return generated / elapsed, len(prompts), f"generate_batch (warm-up timed), {mean_out} new tokens each"


def _hf_continuous_manager(manager_cm, cfg, prompts, outs, device: str) -> tuple[float, int, str]:
    kwargs = dict(generation_config=cfg, block=True, timeout=5)
    if "workload_hints" in inspect.signature(manager_cm).parameters:  # sizes its cache, as generate_batch does
        from transformers.generation.continuous_batching.continuous_api import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                 max_generated_length=max(outs), num_requests=len(prompts))
    # No inference_mode here: the manager computes in its own thread (no-grad there), and tensors
    # made in inference mode on this thread could not be updated in place by it.
    with torch.no_grad():
        # The manager's warm-up (graph capture, where this version has one) happens on entry,
        # before the clock starts, as Tandem's engine is built and warmed before its run.
        with manager_cm(**kwargs) as manager:
            t0 = time.perf_counter()
            for i, (p, n) in enumerate(zip(prompts, outs)):
                manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=n)
            done: dict[str, int] = {}
            while len(done) < len(prompts):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    if getattr(result, "error", None):
                        raise RuntimeError(f"HF continuous batching failed {result.request_id}: {result.error}")
                    done[result.request_id] = len(result.generated_tokens)
                elif result is None and not manager.is_running():
                    raise RuntimeError("HF continuous batching loop stopped early")
            sync(device)
            elapsed = time.perf_counter() - t0
    generated = sum(done.values())
    requested = sum(outs)
    if generated != requested:
        raise RuntimeError(f"HF continuous batching generated {generated} tokens, {requested} requested")
    return generated / elapsed, len(prompts), "manager.add_request, each request's own max_new_tokens"


def static_tokens_per_step(outs: list[int], batch: int) -> float:
    """Requested tokens per decode step of static batching (a batch runs as long as its longest
    request): what makes a subset cheaper or dearer for HF static than the whole workload."""
    steps = sum(max(outs[i : i + batch]) for i in range(0, len(outs), batch))
    return sum(outs) / steps


def measure_decode_b1(engine, prompt: list[int], device: str, new_tokens: int = 257) -> float:
    """Median seconds per decode step of one sequence after `prompt` (context len(prompt) to
    len(prompt) + new_tokens): the time between consecutive tokens in steady state. Steps are
    timed back to back without a device sync between them (a sync per step would serialise the
    host work that overlap scheduling hides). Each step waits for the previous step's token, so a
    step's wall time is the decode time of one token, whichever of host or GPU is the bottleneck."""
    engine.add_request("b1", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=new_tokens, ignore_eos=True,
                                                                            temperature=0, detokenize=False))
    engine.step()  # prefill
    step_times = []
    sync(device)
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t)
    sync(device)
    step_times.sort()
    return step_times[len(step_times) // 2]


def hf_greedy(model, prompt, n, device) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    return out[0, len(prompt):].tolist()


def build_models(args, tmp: Path):
    """An HF model (random, seeded) and a model folder (config + tokenizer) for Tandem."""
    import transformers

    from tandem.engine.make_model import build_tokenizer, make_model

    if args.device.startswith("cuda"):
        config = transformers.AutoConfig.from_pretrained(CONFIG_8B)
        torch.manual_seed(0)
        with torch.device(args.device):
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        folder = tmp / "llama3-8b-random"
        config.save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        return hf.eval(), folder, True
    folder = make_model(tmp / "small-llama", "llama", seed=0, size="small")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return hf.eval(), folder, False


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: every parameter except the embedding table (one row read).
    FP8 weights count one byte each, their float32 scales four: the FP8 roofline."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    return total


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the matmuls a prompt token runs through, whatever their dtype: every parameter
    but the embedding table, the norms, biases and FP8 scales."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() >= 2 and "embed_tokens" not in name and not name.endswith("_scale"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--hf-static-requests", type=int, default=None)
    ap.add_argument("--hf-cb-requests", type=int, default=None, help="default: the whole workload; 0 skips it")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-only", action="store_true",
                    help="run only the HF baselines and write hf_baselines_<device>.json (for --hf-static-from)")
    ap.add_argument("--hf-static-from", default=None,
                    help="take the HF static figure from an --hf-only run's JSON (same device and workload) "
                         "instead of measuring it here: the whole workload's static batching took ~4.5 min on an H100")
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="Tandem's per-step token budget in the throughput run (default 256 on GPU: the best "
                         "of the committed H100 sweep; 2048 on CPU)")
    ap.add_argument("--scheduling-policy", default="lof", choices=["fcfs", "lof"],
                    help="Tandem's waiting-queue order for the throughput run (EngineConfig.scheduling_policy)")
    ap.add_argument("--sweep", default="",
                    help="extra throughput runs on the same engine, e.g. 'fcfs:8192,lof:1024' (policy:budget)")
    ap.add_argument("--trace-steps", action="store_true",
                    help="record every throughput step's shape and host/device time (bench/step_trace.py)")
    ap.add_argument("--compare-no-overlap", action="store_true",
                    help="also measure decode b1 and throughput with async_scheduling off")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="Tandem's weights: fp8 quantizes the bf16 weights while loading (EngineConfig.quantization; "
                         "per-channel e4m3). The report goes to engine_<device>_fp8.{json,md}; decode is "
                         "measured against the FP8 roofline (weight bytes halved), prefill against the FP8 "
                         "matmul rate too")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python bench/engine_bench.py " + " ".join(sys.argv[1:]),
        "quantization": args.quantization,
    }
    try:
        import triton
        import transformers

        results["triton"] = triton.__version__
        results["transformers"] = transformers.__version__
    except ImportError:
        results["triton"] = None
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    partial = Path(args.out) / "engine_partial.json"  # what a run cut short still leaves; removed at the end

    def checkpoint() -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=2) + "\n")

    results["copy_bandwidth_gb_s"] = measure_copy_bandwidth(args.device) / 1e9
    results["matmul_tflops"] = measure_matmul(args.device, dtype) / 1e12
    if args.quantization == "fp8" and gpu:
        fp8_rate = measure_fp8_matmul(args.device)
        results["matmul_fp8_tflops"] = None if fp8_rate is None else fp8_rate / 1e12
    log(f"copy {results['copy_bandwidth_gb_s']:.0f} GB/s, matmul {results['matmul_tflops']:.0f} TFLOP/s")

    num = args.num_requests or (256 if gpu else 32)
    lo, hi, mean_out, cap = (64, 1024, 128, 1024) if gpu else (16, 256, 32, 128)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    hf, folder, _ = build_models(args, tmp)
    vocab = hf.config.vocab_size
    prompts, outs = make_workload(num, lo, hi, mean_out, cap, vocab)
    results["workload"] = dict(num_requests=num, prompt_len=[lo, hi], output_mean=mean_out, output_cap=cap,
                               prompt_tokens=sum(map(len, prompts)), output_tokens=sum(outs))
    pad_id = 0

    parity_prompts = [p[:64] for p in prompts[:4]]
    hf_ref = [hf_greedy(hf, p, 16, args.device) for p in parity_prompts]
    with torch.inference_mode():  # HF's next-token distribution at the end of each parity prompt
        hf_lp = [torch.log_softmax(hf(torch.tensor([p], device=args.device)).logits[0, -1].float(), -1).cpu()
                 for p in parity_prompts]
    if not args.skip_hf:
        # Static batching's cost follows each batch's longest request, so a prefix of the workload
        # stands for the whole only if its requested-tokens-per-step is close to the whole's (64 of
        # the GPU workload's 256: 7.33 vs 7.22; the first 32 alone, 12.3, flattered HF 1.7x).
        batch = 32 if gpu else 8
        if args.hf_static_from:
            results["hf_static"] = earlier_hf_static(Path(args.hf_static_from), results)
            log(f"HF static: {results['hf_static']['tok_s']:.1f} tok/s from {args.hf_static_from}")
        else:
            n_static = args.hf_static_requests or (64 if gpu else 16)
            tps, n = hf_static(hf, prompts[:n_static], outs[:n_static], batch, args.device, pad_id)
            results["hf_static"] = dict(tok_s=tps, requests=n, batch=batch,
                                        tokens_per_step_subset=static_tokens_per_step(outs[:n], batch),
                                        tokens_per_step_workload=static_tokens_per_step(outs, batch))
            log(f"HF static: {tps:.1f} tok/s on {n} requests")
            checkpoint()
        n_cb = num if args.hf_cb_requests is None else args.hf_cb_requests
        if n_cb:
            try:
                tps, n, mode = hf_continuous(hf, prompts[:n_cb], outs[:n_cb], args.device, pad_id)
                results["hf_continuous"] = dict(tok_s=tps, requests=n, mode=mode)
                log(f"HF continuous batching: {tps:.1f} tok/s on {n} requests ({mode})")
            except Exception as e:  # an API difference across transformers versions must not lose the run
                results["hf_continuous"] = dict(error=repr(e)[:500])
                log(f"HF continuous batching failed: {e!r}")
        checkpoint()
    if args.hf_only:
        out = Path(args.out) / f"hf_baselines_{device_tag(results['device'], gpu)}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        partial.unlink(missing_ok=True)
        log(f"wrote {out}")
        return 0

    # Hand the same weights to Tandem through host memory, freeing the device for its KV cache.
    state = {k: v.detach().to("cpu") for k, v in hf.state_dict().items()}
    del hf
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    budget = args.max_batched_tokens or (256 if gpu else 2048)
    sweep = [(p, int(b)) for p, b in (item.split(":") for item in args.sweep.split(",") if item)]
    if any(b < 1 or p not in ("fcfs", "lof") for p, b in sweep):
        raise SystemExit("--sweep entries must be fcfs|lof:budget with budget >= 1")
    # The engine is built with a budget of at least 8192 (the 4k prefill below runs in one step,
    # and every size of mixed-step CUDA graph is captured); each throughput run then sets the
    # scheduler's live budget and queue order.
    engine_budget = max([budget, 8192 if gpu else 2048] + [b for _, b in sweep])
    llm = LLM(str(folder), device=args.device, dtype="bfloat16" if gpu else "float32", weights=state.items(),
              max_num_seqs=256, max_num_batched_tokens=engine_budget, max_model_len=8192 if gpu else 2048,
              scheduling_policy=args.scheduling_policy, quantization=args.quantization)
    del state
    results["engine_start_s"] = time.perf_counter() - t0
    results["num_kv_blocks"] = llm.engine.block_manager.num_blocks
    log(f"engine up in {results['engine_start_s']:.1f}s with {results['num_kv_blocks']} KV blocks")
    greedy = SamplingParams(temperature=0, max_tokens=16, detokenize=False)
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in parity_prompts], greedy)]
    matches = [sum(a == b for a, b in zip(x, y)) for x, y in zip(ours, hf_ref)]
    first_div = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, hf_ref)]
    firsts = llm.generate([{"prompt_token_ids": p} for p in parity_prompts],
                          SamplingParams(temperature=0, max_tokens=1, logprobs=20, detokenize=False))
    lp_diff, gaps = [], []
    for out, ref in zip(firsts, hf_lp):
        top = out.outputs[0].logprobs[0]
        lp_diff.append(max(abs(v.logprob - ref[t].item()) for t, v in top.items()))
        two = ref.topk(2).values
        gaps.append((two[0] - two[1]).item())
    results["parity"] = dict(prompts=len(parity_prompts), tokens_each=16, identical_sequences=sum(
        x == y for x, y in zip(ours, hf_ref)), first_divergence=first_div, matching_positions=matches,
        max_abs_logprob_diff_top20=lp_diff, hf_top1_top2_logprob_gap=gaps)
    log(f"parity vs HF: {results['parity']}")
    checkpoint()

    engine = llm.engine
    # 1. batch-1 decode: time decode-only steps of one sequence.
    rng = random.Random(1)
    prompt = [rng.randrange(10, vocab - 10) for _ in range(128)]
    decode_s = measure_decode_b1(engine, prompt, args.device)
    cfg = engine.hf_config
    shape = ModelShape.from_config(cfg.to_dict(), 2 if gpu else 4)
    bytes_per_step = weight_bytes(engine.runner.model) + shape.kv_bytes_per_token * (128 + 128)  # median context
    roofline_s = bytes_per_step / (results["copy_bandwidth_gb_s"] * 1e9)
    results["decode_b1_ms"] = decode_s * 1e3
    results["decode_b1_roofline_ms"] = roofline_s * 1e3
    results["decode_b1_roofline_fraction"] = roofline_s / decode_s
    log(f"decode b1: {decode_s*1e3:.2f} ms/token, roofline {roofline_s*1e3:.2f} ms -> {roofline_s/decode_s:.1%}")

    # 2. prefill of a 4k prompt (fresh tokens each run: no prefix hits).
    if gpu:
        T = 4096
        times = []
        for r in range(4):
            p = [rng.randrange(10, vocab - 10) for _ in range(T)]
            engine.add_request(f"pf{r}", {"prompt_token_ids": p}, SamplingParams(max_tokens=1, detokenize=False))
            sync(args.device)
            t = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            sync(args.device)
            times.append(time.perf_counter() - t)
        prefill_s = sorted(times[1:])[1]
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        linear_params = matmul_params(engine.runner.model) - cfg.vocab_size * cfg.hidden_size  # lm_head: 1 row
        flops = 2 * linear_params * T + 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * T * T  # causal QK+PV
        results["prefill_4k_ms"] = prefill_s * 1e3
        results["prefill_4k_tflops"] = flops / prefill_s / 1e12
        results["prefill_4k_matmul_fraction"] = results["prefill_4k_tflops"] / results["matmul_tflops"]
        if results.get("matmul_fp8_tflops"):
            results["prefill_4k_fp8_matmul_fraction"] = results["prefill_4k_tflops"] / results["matmul_fp8_tflops"]
        log(f"prefill 4k: {prefill_s*1e3:.1f} ms, {results['prefill_4k_tflops']:.0f} TFLOP/s "
            f"({results['prefill_4k_matmul_fraction']:.1%} of matmul)")

    # 3. offline throughput on the mixed workload.
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False) for m in outs]

    traces: list[dict] = []  # one per throughput run, in order, with --trace-steps

    def run_throughput():
        engine.block_manager.reset_prefix_cache()
        sync(args.device)
        tracer = StepTracer(engine.runner) if args.trace_steps else contextlib.nullcontext()
        with tracer:
            t = time.perf_counter()
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            sync(args.device)
            elapsed = time.perf_counter() - t
        if args.trace_steps:
            traces.append(dict(tracer.summary(elapsed), step_list=tracer.steps()))
            log(f"trace: {json.dumps({k: v for k, v in traces[-1].items() if k != 'step_list'})}")
        got = sum(len(o.outputs[0].token_ids) for o in res)
        assert got == sum(outs), (got, sum(outs))
        return res, got, elapsed

    engine.scheduler.policy, engine.scheduler.max_num_batched_tokens = args.scheduling_policy, budget
    res, got, elapsed = run_throughput()
    results["tandem"] = dict(tok_s=got / elapsed, requests=num, seconds=elapsed,
                             total_tok_s=(got + results["workload"]["prompt_tokens"]) / elapsed,
                             scheduling_policy=args.scheduling_policy, max_num_batched_tokens=budget)
    if traces:
        results["tandem"]["step_trace"] = traces[-1]
    log(f"Tandem: {got/elapsed:.0f} output tok/s over {num} requests ({elapsed:.1f}s, "
        f"{args.scheduling_policy}, budget {budget})")
    checkpoint()
    if sweep:
        # Other scheduler settings on the same engine and workload (the engine's frozen config
        # is not re-read: the scheduler's own fields are the live ones).
        results["tandem_sweep"] = []
        for policy, b in sweep:
            engine.scheduler.policy, engine.scheduler.max_num_batched_tokens = policy, b
            sweep_res, _, sweep_elapsed = run_throughput()
            # In bf16, other batch shapes pick other GEMM kernels, so a near-tied greedy token can
            # flip and the sequence diverge from there: count, do not require.
            same = sum(a.outputs[0].token_ids == c.outputs[0].token_ids for a, c in zip(res, sweep_res))
            results["tandem_sweep"].append(dict(scheduling_policy=policy, max_num_batched_tokens=b,
                                                tok_s=got / sweep_elapsed, seconds=sweep_elapsed,
                                                sequences_identical=same))
            if traces:
                results["tandem_sweep"][-1]["step_trace"] = traces[-1]
            checkpoint()
            log(f"Tandem {policy}, budget {b}: {got/sweep_elapsed:.0f} output tok/s ({sweep_elapsed:.1f}s), "
                f"{same}/{num} sequences identical to the main run")
        engine.scheduler.policy, engine.scheduler.max_num_batched_tokens = args.scheduling_policy, budget
    if args.compare_no_overlap:
        # The same two measurements with overlap scheduling off: what overlapping host work buys.
        engine.config = dataclasses.replace(engine.config, async_scheduling=False)
        engine.add_request("b1-sync", {"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=257, ignore_eos=True, temperature=0, detokenize=False))
        engine.step()
        sync_times = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            sync_times.append(time.perf_counter() - t)
        sync_res, _, sync_elapsed = run_throughput()
        # Known output lengths (EOS ignored): both modes run the same batches, so greedy tokens
        # must match exactly.
        results["overlap_tokens_identical"] = all(
            a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(res, sync_res))
        results["no_overlap"] = dict(decode_b1_ms=sorted(sync_times)[len(sync_times) // 2] * 1e3,
                                     tok_s=got / sync_elapsed, seconds=sync_elapsed)
        engine.config = dataclasses.replace(engine.config, async_scheduling=True)
        log(f"without overlap scheduling: decode b1 {results['no_overlap']['decode_b1_ms']:.2f} ms, "
            f"{results['no_overlap']['tok_s']:.0f} output tok/s")
    results["throughput_tok_s"] = {"tandem": got / elapsed,
                                   "hf_static": results.get("hf_static", {}).get("tok_s"),
                                   "hf_continuous": results.get("hf_continuous", {}).get("tok_s")}
    for key, name in (("hf_static", "throughput_vs_hf_static"), ("hf_continuous", "throughput_vs_hf_cb")):
        base = results["throughput_tok_s"][key]
        results[name] = (got / elapsed) / base if base else None
    # What no engine could beat on this device and workload, from this run's measured rates.
    bound = throughput_bound(shape, WorkloadCounts.of([len(p) for p in prompts], outs),
                             results["copy_bandwidth_gb_s"], results["matmul_tflops"])
    results["throughput_bound"] = run_figures(bound, got / elapsed, results["throughput_tok_s"]["hf_static"])
    write_reports(results, Path(args.out), gpu)
    partial.unlink(missing_ok=True)
    return 0


def device_tag(device: str, gpu: bool) -> str:
    return "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")[:40] if gpu else "cpu"


def earlier_hf_static(path: Path, results: dict) -> dict:
    """The HF static figure of an earlier `--hf-only` run, checked to be on this device kind and
    this workload (so the ratio compares the same work), with where it came from."""
    earlier = json.loads(path.read_text())
    for key in ("device", "workload"):
        if earlier.get(key) != results[key]:
            raise SystemExit(f"{path}: its {key} {earlier.get(key)!r} differs from this run's {results[key]!r}")
    if "tok_s" not in earlier.get("hf_static", {}):
        raise SystemExit(f"{path} holds no HF static figure")
    return dict(earlier["hf_static"], source=str(path), source_command=earlier.get("command"))


def split_step_lists(results: dict, path: Path) -> None:
    """Moves the step traces' per-step lists out of `results` into one compact file (they are
    most of the bytes); the summaries stay."""
    runs = [("tandem", results.get("tandem", {}))] + [
        (f"sweep {r['scheduling_policy']}:{r['max_num_batched_tokens']}", r) for r in results.get("tandem_sweep", [])]
    lists = {name: r["step_trace"].pop("step_list") for name, r in runs if "step_list" in r.get("step_trace", {})}
    if lists:
        path.write_text(json.dumps({"columns": ["decode seqs", "prompt tokens", "decode context", "host ms",
                                                "device ms"], "runs": lists}, separators=(",", ":")) + "\n")
        results["step_lists_file"] = path.name


def write_reports(results: dict, out: Path, gpu: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"engine_{device_tag(results['device'], gpu)}" + (f"_{results['quantization']}"
                                                              if results.get("quantization") else "")
    split_step_lists(results, out / f"{name}_steps.json")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")

    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    t = results["throughput_tok_s"]
    lines = [
        f"# Engine benchmark on {results['device']}",
        "",
        f"torch {results['torch']}, triton {results.get('triton')}, transformers {results.get('transformers')}; "
        f"weights {results.get('quantization') or 'in the model dtype'}. "
        "Command: `" + results["command"] + "`.",
        "",
        "| figure | value | meaning |",
        "| --- | --- | --- |",
        f"| copy bandwidth | {f(results['copy_bandwidth_gb_s'], '{:.0f}')} GB/s | device copy, bytes read + written, measured in this run |",
        f"| matmul rate | {f(results['matmul_tflops'], '{:.0f}')} TFLOP/s | square matmul in the model dtype, this run |",
        f"| decode batch 1 | {f(results['decode_b1_ms'])} ms/token | median decode step wall time, one sequence, context 128-384, steps back to back |",
        f"| decode roofline | {f(results['decode_b1_roofline_ms'])} ms | (weights + KV bytes) / copy bandwidth |",
        f"| decode vs roofline | {f(results['decode_b1_roofline_fraction'], '{:.1%}')} | roofline / measured (target >= 90%) |",
    ]
    if "prefill_4k_tflops" in results:
        lines += [
            f"| prefill 4k | {f(results['prefill_4k_ms'], '{:.1f}')} ms, {f(results['prefill_4k_tflops'], '{:.0f}')} TFLOP/s | one 4096-token prompt, matmul + causal attention FLOPs |",
            f"| prefill vs matmul | {f(results['prefill_4k_matmul_fraction'], '{:.1%}')} | target >= 60% |",
        ]
    if "matmul_fp8_tflops" in results:
        lines += [
            f"| FP8 matmul rate | {f(results['matmul_fp8_tflops'], '{:.0f}')} TFLOP/s | square e4m3 `torch._scaled_mm`, row-wise scales, this run |",
            f"| prefill vs FP8 matmul | {f(results.get('prefill_4k_fp8_matmul_fraction'), '{:.1%}')} | the 4k prefill's rate / the FP8 matmul rate |",
        ]
    w = results["workload"]
    hs, hc = results.get("hf_static", {}), results.get("hf_continuous", {})
    lines += [
        f"| Tandem throughput | {f(t['tandem'], '{:.0f}')} output tok/s | {w['num_requests']} requests, prompts {w['prompt_len']} tokens, outputs exp(mean {w['output_mean']}) capped {w['output_cap']}, EOS ignored; scheduling {results['tandem'].get('scheduling_policy')}, step budget {results['tandem'].get('max_num_batched_tokens')} tokens |",
        f"| HF static batching | {f(t['hf_static'], '{:.1f}')} output tok/s | `generate`, batches of {hs.get('batch')}, first {hs.get('requests')} requests, requested tokens only; requested tokens per decode step {f(hs.get('tokens_per_step_subset'))} in this subset vs {f(hs.get('tokens_per_step_workload'))} over the whole workload{'; measured by an earlier run on this device kind: `' + hs['source_command'] + '`' if hs.get('source') else ''} |",
        f"| HF continuous batching | {f(t['hf_continuous'], '{:.1f}')} output tok/s | first {hc.get('requests')} requests, {hc.get('mode')} |",
        f"| vs HF static | {f(results['throughput_vs_hf_static'], '{:.1f}x')} | target >= 50x |",
        f"| vs HF continuous | {f(results['throughput_vs_hf_cb'], '{:.1f}x')} | target >= 10x |",
    ]
    b = results.get("throughput_bound")
    if b:
        lines += [
            f"| throughput bound | {f(b['output_tok_s'], '{:.0f}')} output tok/s ({f(b['bound_s'])} s, {b['bound_by']}) | no engine computing these tokens in this dtype beats it here: the longest request's {b['counts']['min_steps']} steps each read all weights, and every decode token its context's KV ({f(b['bytes_s'])} s at the copy bandwidth); or all FLOPs at the matmul rate ({f(b['flops_s'])} s) (`bench/throughput_bound.py`) |",
            f"| Tandem vs bound | {f(b['fraction'], '{:.1%}')} | Tandem throughput / bound |",
        ]
        if "vs_hf_static_at_bound" in b:
            lines.append(f"| HF static ratio at the bound | {f(b['vs_hf_static_at_bound'], '{:.1f}x')} | the ratio an engine at the bound would reach; 50x needs {f(b['fraction_needed_for_50x_hf_static'], '{:.1%}')} of the bound |")
    for row in results.get("tandem_sweep", []):
        lines.append(f"| Tandem, {row['scheduling_policy']}, budget {row['max_num_batched_tokens']} | "
                     f"{f(row['tok_s'], '{:.0f}')} output tok/s | same engine and workload, other scheduler "
                     f"settings; sequences identical to the main run's: "
                     f"{row.get('sequences_identical', row.get('tokens_identical'))} |")
    if "no_overlap" in results:
        n = results["no_overlap"]
        lines += [
            f"| decode batch 1, overlap off | {f(n['decode_b1_ms'])} ms/token | same measurement with `async_scheduling=False` (host work serial with the GPU) |",
            f"| throughput, overlap off | {f(n['tok_s'], '{:.0f}')} output tok/s | same workload with `async_scheduling=False` |",
        ]
    lines += [
        "",
        f"Greedy parity vs HF on the same weights: {results['parity']}",
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
