"""Where an engine step's time goes, on a GPU: a profiling script, not a benchmark.

    python bench/probes/step_profile.py --out /tmp/prof      # Llama-3-8B shape, random bf16 weights

1. Batch-1 decode: the kernels of one captured decode step (torch profiler over graph
   replays), grouped by kernel, with their share of the step.
2. Decode steps at several batch sizes (graph replay), median wall time per step.
3. The mixed offline workload of `engine_bench.py`, with each engine step split into host
   phases (schedule, prepare+launch, sampling launch, reading the previous step's tokens incl.
   the wait for the GPU + per-token bookkeeping, the rest) and
   a per-step log (tokens, sequences, wall), so the serial host share and the tail are visible.
Writes `step_profile.json` (and the profiler table) under --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tandem.bench.engine_bench import CONFIG_8B
from tandem.bench.workload import make_workload
from tandem import LLM, SamplingParams


def timed(record: dict[str, list[float]], name: str, fn):
    """`fn` wrapped so each call's wall time is appended to `record[name]`."""
    def wrapper(*a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        record[name].append(time.perf_counter() - t)
        return r
    return wrapper


def build_llm(max_num_seqs: int = 256, async_scheduling: bool = True) -> LLM:
    import transformers

    from tandem.engine.make_model import build_tokenizer

    config = transformers.AutoConfig.from_pretrained(CONFIG_8B)
    folder = Path(tempfile.mkdtemp(prefix="tandem-prof-")) / "llama3-8b-random"
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = hf.state_dict()
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", weights=state.items(), max_num_seqs=max_num_seqs,
              max_num_batched_tokens=8192, max_model_len=8192, async_scheduling=async_scheduling)
    del hf, state
    torch.cuda.empty_cache()
    return llm


def profile_b1(llm: LLM, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    rng = random.Random(1)
    prompt = [rng.randrange(10, vocab - 10) for _ in range(256)]
    engine.add_request("b1", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=80, ignore_eos=True,
                                                                            temperature=0, detokenize=False))
    engine.step()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    steps = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    (out / "b1_profiler.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    total, count, rows = kernel_table(prof, steps, limit=25)
    return {"gpu_us_per_step": total, "kernels_per_step": count, "by_kernel": rows}


def kernel_table(prof, steps: int, limit: int = 30) -> tuple[float, int, list[dict]]:
    """The profiled steps' GPU kernels grouped by name: (GPU us per step, kernels per step, the
    `limit` costliest rows)."""
    kernels: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:90]] += ev.device_time_total / steps
            counts[ev.name[:90]] += 1
    total = sum(kernels.values())
    table = sorted(((k, v, counts[k] // steps) for k, v in kernels.items()), key=lambda r: -r[1])
    return total, sum(c for _, _, c in table), [
        {"name": k, "us_per_step": round(v, 1), "per_step": c, "share": round(v / total, 3)} for k, v, c in table[:limit]]


def profile_mixed(llm: LLM, out: Path, num_decodes: int = 48, budget: int = 256, steps: int = 20) -> dict:
    """Mixed steps as the offline workload's small-budget runs make them: `num_decodes` sequences
    decoding at ~650 tokens of context plus a prompt chunk filling the rest of `budget`, each
    step one mixed-step CUDA graph. Kernels grouped by name, and the steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    sched = engine.scheduler
    vocab = engine.hf_config.vocab_size
    rng = random.Random(4)
    old_budget = sched.max_num_batched_tokens
    for i in range(num_decodes):
        engine.add_request(f"md{i}", {"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(640)]},
                           SamplingParams(max_tokens=400, ignore_eos=True, temperature=0, detokenize=False))
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()
    sched.max_num_batched_tokens = budget
    for i in range(16):  # prompts enough for every profiled step's chunk
        engine.add_request(f"mp{i}", {"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(1000)]},
                           SamplingParams(max_tokens=1, temperature=0, detokenize=False))
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    (out / "mixed_profiler.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    # The same steps without the profiler: wall time per step.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - t) * 1e3 / steps
    for rid in list(engine.requests):
        engine.abort_request(rid)
    sched.max_num_batched_tokens = old_budget
    total, count, rows = kernel_table(prof, steps)
    res = {"num_decodes": num_decodes, "budget": budget, "gpu_us_per_step": total, "wall_ms_per_step": plain_ms,
           "wall_ms_per_step_profiled": wall_ms, "kernels_per_step": count, "by_kernel": rows}
    print(json.dumps(res, indent=1)[:5000], flush=True)
    return res


def host_phases(llm: LLM, batch: int = 1, steps: int = 100) -> dict:
    """Decode steps of `batch` sequences with host phases timed by perf_counter (no profiler):
    where the gap between the captured graph's GPU time and the step's wall time goes."""
    engine = llm.engine
    runner = engine.runner
    vocab = engine.hf_config.vocab_size
    rng = random.Random(3)
    for i in range(batch):
        engine.add_request(f"ph{batch}-{i}", {"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(256)]},
                           SamplingParams(max_tokens=steps + 20, ignore_eos=True, temperature=0, detokenize=False))
    while len(engine.scheduler.running) < batch or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    acc = collections.defaultdict(list)
    graphs = runner.graphs
    graph = graphs.graphs[graphs.padded_size(batch)]
    orig_prepare, orig_run, orig_replay = runner.prepare, graphs.run, graph.replay
    sched_fn = engine.scheduler.schedule
    runner.prepare = timed(acc, "prepare", orig_prepare)
    graphs.run = timed(acc, "graph_run_incl_replay", orig_run)
    graph.replay = timed(acc, "replay_call", orig_replay)
    engine.scheduler.schedule = timed(acc, "schedule", sched_fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        acc["step_wall"].append(time.perf_counter() - t)
    # GPU time of the graph alone, back to back.
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        orig_replay()
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) / 20
    runner.prepare, graphs.run, graph.replay = orig_prepare, orig_run, orig_replay
    engine.scheduler.schedule = sched_fn
    while engine.has_unfinished_requests():
        engine.step()
    res = {k: statistics.median(v) * 1e3 for k, v in acc.items()}
    res["graph_gpu_ms_back_to_back"] = gpu
    print(f"batch {batch} host phases (median ms):", json.dumps(res), flush=True)
    return res


def decode_batch_times(llm: LLM, batch_sizes=(1, 8, 32, 64, 128, 256), ctx: int = 512) -> dict:
    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    rng = random.Random(2)
    res = {}
    for bs in batch_sizes:
        for i in range(bs):
            prompt = [rng.randrange(10, vocab - 10) for _ in range(ctx)]
            engine.add_request(f"d{bs}-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=40, ignore_eos=True, temperature=0, detokenize=False))
        times = []
        while engine.has_unfinished_requests():
            n_running = len(engine.scheduler.running)
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            times.append((n_running, time.perf_counter() - t))
        full = [dt for n, dt in times[-30:]]
        res[bs] = {"median_ms": statistics.median(full) * 1e3}
        print(f"decode bs={bs} ctx~{ctx}: {res[bs]['median_ms']:.2f} ms/step", flush=True)
    return res


def profile_throughput(llm: LLM, num: int = 256) -> dict:
    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    prompts, outs = make_workload(num, 64, 1024, 128, 1024, vocab)
    engine.block_manager.reset_prefix_cache()
    phase = collections.defaultdict(list)
    steps = []
    sched_fn, exec_fn = engine.scheduler.schedule, engine.runner.execute
    samp_fn, finish_fn = engine.sampler.sample, engine._finish_in_flight
    last = {}

    def schedule():
        s = sched_fn()
        last["tokens"] = sum(i.num_new_tokens for i in s.scheduled)
        last["seqs"] = len(s.scheduled)
        return s

    engine.scheduler.schedule = timed(phase, "schedule", schedule)
    engine.runner.execute = timed(phase, "prepare_and_launch", exec_fn)

    engine.sampler.sample = timed(phase, "sample_launch", samp_fn)
    # With overlap scheduling the wait for the GPU happens here, while the next step runs.
    engine._finish_in_flight = timed(phase, "read_tokens_incl_gpu_wait_and_bookkeeping", finish_fn)
    for i, (p, m) in enumerate(zip(prompts, outs)):
        engine.add_request(f"t{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs_ = engine.step()
        dt = time.perf_counter() - t
        got += sum(len(o.outputs[0].token_ids) for o in outs_ if o.finished)
        steps.append((last.get("tokens", 0), last.get("seqs", 0), round(dt * 1e3, 3)))
    elapsed = time.perf_counter() - t0
    engine.scheduler.schedule, engine.runner.execute = sched_fn, exec_fn
    del engine.sampler.sample, engine._finish_in_flight  # the class's methods again
    total_step = sum(s[2] for s in steps) / 1e3
    decode_steps = [s for s in steps if s[0] == s[1]]
    mixed = [s for s in steps if s[0] != s[1]]
    return {
        "elapsed_s": elapsed, "output_tokens": got, "tok_s": got / elapsed, "num_steps": len(steps),
        "phases_s": {k: sum(v) for k, v in phase.items()},
        "post_s": total_step - sum(sum(v) for v in phase.values()),
        "decode_steps": len(decode_steps), "decode_steps_s": sum(s[2] for s in decode_steps) / 1e3,
        "mixed_steps": len(mixed), "mixed_steps_s": sum(s[2] for s in mixed) / 1e3,
        "steps_under_8_seqs": sum(1 for s in steps if s[1] < 8),
        "steps_under_8_seqs_s": sum(s[2] for s in steps if s[1] < 8) / 1e3,
        "steps": steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/prof")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--b1-phases", action="store_true")
    ap.add_argument("--sync", action="store_true", help="no overlap scheduling (async_scheduling=False)")
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed-step profile (profile_mixed)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = build_llm(async_scheduling=not args.sync)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "async_scheduling": not args.sync}
    if args.mixed_only:
        res["mixed"] = profile_mixed(llm, out)
        (out / "step_profile.json").write_text(json.dumps(res, indent=1))
        return 0
    if args.b1_phases:
        res["host_phases"] = {bs: host_phases(llm, bs) for bs in (1, 64, 256)}
    if not args.throughput_only:
        res["b1"] = profile_b1(llm, out)
        print(json.dumps({k: v for k, v in res["b1"].items()}, indent=1)[:4000], flush=True)
        res["decode_batches"] = decode_batch_times(llm)
    res["throughput"] = profile_throughput(llm)
    summary = {k: v for k, v in res["throughput"].items() if k != "steps"}
    print(json.dumps(summary, indent=1), flush=True)
    (out / "step_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
