"""Prefix-aware vs round-robin routing on GPUs: multi-turn chat through the real Serve app.

    python bench/routing_gpu_bench.py --out bench/results      # on a GPU host with Ray installed

Several engine replicas of one random-weight model (a Llama-3.2-3B shape by default) run as
the Tandem Serve app (ingress + replica pool, `workers.app.build_app`), sharing the GPUs of this
host (`--gpus-per-replica`, e.g. 4 replicas x 0.25 of one H100 when no multi-GPU host is lent).
For each routing policy the same closed-loop multi-turn chat load is replayed over HTTP:
`--concurrency` conversations at a time, each `--turns` turns long; turn 1 carries a shared
system prompt and a long document (each conversation's own, or one of `--documents` shared
ones), later turns add a short user message to the whole history (including the model's real
previous answers), as chat clients do.
TTFT is measured at the client (request sent -> the first streamed token's chunk, whatever its text).

Writes routing_<device>.json / .md with `ttft_mean_ms` per policy and
`ttft_roundrobin_over_prefix` (the issue's contract), plus percentiles, follow-up-turn TTFT,
output throughput and the workload. Every request asks for the serving path's stage stamps
(`"tandem_timing": true`, `router.stage_timing`); each policy's `stage_medians_ms` (all turns)
and `stage_medians_followup_ms` (turns 2+) give the median time spent in each stage up to the
first token, plus `client_outside_ingress` (client TTFT minus the ingress's own first-token
time: the HTTP proxy both ways and the client), so a run separates where TTFT goes.
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# A Llama-3.2-3B attention/MLP shape with the test tokenizer's small vocabulary.
SHAPE_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=32768)


@dataclass
class TurnResult:
    conversation: int
    turn: int
    prompt_words: int
    ttft_s: float
    latency_s: float
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    stages_ms: dict[str, float] | None = None  # stage_intervals(...) of this turn


@dataclass
class PolicyRun:
    policy: str
    results: list[TurnResult] = field(default_factory=list)
    wall_s: float = 0.0


def make_model(folder: Path) -> Path:
    """A random bf16 model folder (config, safetensors, tokenizer), built on the GPU."""
    import torch
    import transformers

    from tandem.engine.make_model import build_config, build_tokenizer

    tok = build_tokenizer()
    config = build_config("llama", "small", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for k, v in SHAPE_3B.items():
        setattr(config, k, v)
    config.initializer_range = 0.02
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def single_token_words(folder: Path) -> list[str]:
    """Vocabulary words that are one token each with a leading space: text built from them has
    a known token count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    words = sorted({w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3})
    return [w for w in words if len(tok(" " + w, add_special_tokens=False).input_ids) == 1]


@dataclass
class StreamResult:
    ttft_s: float  # request sent -> first streamed token (its chunk, even with empty text)
    latency_s: float
    text: str
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the replica's prefix cache
    timing: dict | None = None  # the reply's `tandem_timing` (router.stage_timing), when asked for


def chat_stream(port: int, model: str, messages: list[dict], max_tokens: int, timeout: float,
                timing: bool = False) -> StreamResult:
    """One streamed chat completion. `timing`: ask for the serving path's stage stamps."""
    request = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if timing:
        request["tandem_timing"] = True
    body = json.dumps(request).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft = None
    parts: list[str] = []
    tokens = prompt_tokens = cached = 0
    stages = None
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("error"):  # the server ended the stream with an error event
            raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:300]}")
        if "tandem_timing" in chunk:
            stages = chunk["tandem_timing"]
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            prompt_tokens = chunk["usage"]["prompt_tokens"]
            cached = ((chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            if delta.get("role"):  # the opening role chunk (it rides with the first token's)
                continue
            # The first token's chunk, even if its text is empty (a token that decodes to
            # nothing yet, e.g. a special token or part of a multi-byte character): the time
            # the ingress stamps as first_token_sent. Random weights emit such tokens.
            if ttft is None:
                ttft = time.perf_counter() - t0
            if delta.get("content"):
                parts.append(delta["content"])
    latency = time.perf_counter() - t0
    conn.close()
    if ttft is None:
        raise RuntimeError(f"no token streamed ({tokens} completion tokens reported)")
    return StreamResult(ttft, latency, "".join(parts), tokens, prompt_tokens, cached, stages)


def stage_intervals(result: StreamResult) -> dict[str, float] | None:
    """The reply's stage intervals (ms), plus what the client saw outside the ingress."""
    if not result.timing:
        return None
    intervals = dict(result.timing["intervals_ms"])
    sent = result.timing["stamps_ms"].get("first_token_sent")
    if sent is not None:
        intervals["client_outside_ingress"] = result.ttft_s * 1e3 - sent
    intervals["client_ttft"] = result.ttft_s * 1e3
    return intervals


def stage_order() -> list[str]:
    from tandem.router.stage_timing import INTERVALS, TOTAL

    return [*INTERVALS.values(), TOTAL, "client_outside_ingress", "client_ttft"]


def stage_medians(samples: list[dict[str, float]], order: list[str] | None = None) -> dict[str, float]:
    """Median of each stage (or stamp) over the requests that have it, in path order."""
    order = order or stage_order()
    names = sorted({k for s in samples for k in s}, key=lambda k: order.index(k) if k in order else len(order))
    return {k: statistics.median([s[k] for s in samples if k in s]) for k in names}


def run_policy(policy: str, args, words: list[str], model_dir: Path) -> PolicyRun:
    from ray import serve

    from tandem.workers.app import build_app

    app_args = {
        "model": str(model_dir), "served_model_name": "bench", "num_replicas": args.replicas,
        "routing_policy": policy, "device": args.device,
        "worker_num_gpus": args.gpus_per_replica if args.device == "cuda" else 0,
        "max_in_flight": 4096, "max_ongoing_requests": 256, "ingress_replicas": args.ingress_replicas,
        "engine_kwargs": {"dtype": "bfloat16" if args.device == "cuda" else "float32", "max_model_len": args.max_model_len,
                          "num_kv_blocks": args.kv_blocks, "max_num_seqs": 64,
                          "max_num_batched_tokens": args.max_batched_tokens,
                          "long_prefill_token_threshold": args.long_prefill_threshold},
    }
    serve.run(build_app(app_args), name="routing-bench", route_prefix="/")
    rng = random.Random(args.seed)
    system = " ".join(rng.choice(words) for _ in range(args.system_words))
    convs = queue.Queue()
    for c in range(args.conversations):
        convs.put(c)
    run = PolicyRun(policy)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            try:
                c = convs.get_nowait()
            except queue.Empty:
                return
            crng = random.Random(args.seed * 1000 + c)  # same conversation text under every policy
            doc = " ".join(crng.choice(words) for _ in range(args.document_words))
            # The conversation's own document is drawn either way, so its user turns (drawn next
            # from the same generator) are the same with or without shared documents.
            if args.documents:  # the shared document replaces the conversation's own
                drng = random.Random(args.seed * 1000 + 999_983 + c % args.documents)
                doc = " ".join(drng.choice(words) for _ in range(args.document_words))
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": doc + " " + " ".join(crng.choice(words) for _ in range(args.user_words))}]
            for t in range(args.turns):
                prompt_words = sum(len(m["content"].split()) for m in messages)
                try:
                    reply = chat_stream(args.port, "bench", messages, args.output_tokens, args.timeout,
                                        timing=not args.no_stage_timing)
                    res = TurnResult(c, t, prompt_words, reply.ttft_s, reply.latency_s, reply.completion_tokens,
                                     reply.prompt_tokens, reply.cached_tokens, stages_ms=stage_intervals(reply))
                except Exception as e:  # recorded, counted, and the conversation ends
                    with lock:
                        run.results.append(TurnResult(c, t, prompt_words, float("nan"), float("nan"), 0,
                                                      error=repr(e)[:300]))
                    break
                with lock:
                    run.results.append(res)
                messages.append({"role": "assistant", "content": reply.text})
                messages.append({"role": "user", "content": " ".join(crng.choice(words) for _ in range(args.user_words))})

    # Warm-up: one short request per replica's worth, so graph capture/compiles are not timed.
    for _ in range(args.replicas * 2):
        chat_stream(args.port, "bench", [{"role": "user", "content": "hello there"}], 4, args.timeout)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    run.wall_s = time.perf_counter() - t0
    serve.delete("routing-bench")
    return run


def summarize(run: PolicyRun) -> dict:
    ok = [r for r in run.results if r.error is None]
    ttft = sorted(r.ttft_s * 1e3 for r in ok)
    follow = [r.ttft_s * 1e3 for r in ok if r.turn > 0]

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "requests": len(run.results), "errors": len(run.results) - len(ok),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else None,
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9), "ttft_p99_ms": pct(ttft, 0.99),
        "ttft_first_turn_mean_ms": statistics.fmean([r.ttft_s * 1e3 for r in ok if r.turn == 0] or [float("nan")]),
        "ttft_followup_mean_ms": statistics.fmean(follow) if follow else None,
        "latency_mean_ms": statistics.fmean([r.latency_s * 1e3 for r in ok]) if ok else None,
        "output_tok_s": sum(r.output_tokens for r in ok) / run.wall_s if run.wall_s else None,
        "wall_s": run.wall_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
        "error_samples": [r.error for r in run.results if r.error][:3],
        "stage_medians_ms": stage_medians([r.stages_ms for r in ok if r.stages_ms]),
        "stage_medians_followup_ms": stage_medians([r.stages_ms for r in ok if r.stages_ms and r.turn > 0]),
    }


def stage_table(runs: dict[str, dict]) -> list[str]:
    """Markdown: median ms per serving-path stage (columns: policy x all turns / follow-ups)."""
    columns = [(p, key, label) for p in runs for key, label in (("stage_medians_ms", "all"),
                                                                 ("stage_medians_followup_ms", "follow-up"))]
    stages = [s for s in stage_order() if any(s in runs[p][key] for p, key, _ in columns)]
    if not stages:
        return []
    lines = ["", "Median ms per serving-path stage up to the first token (`router.stage_timing`; "
                 "`client_outside_ingress` = client TTFT - ingress first-token time: HTTP proxy both ways + client):", "",
             "| stage | " + " | ".join(f"{p} {label}" for p, _, label in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for stage in stages:
        cells = [runs[p][key].get(stage) for p, key, _ in columns]
        lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.2f}" for v in cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--model", help="model folder (default: a random Llama-3.2-3B shape made here)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--ingress-replicas", type=int, default=1,
                    help="OpenAI ingress replicas (each streams its requests' SSE on its own event loop)")
    ap.add_argument("--gpus-per-replica", type=float, default=0.25)
    ap.add_argument("--kv-blocks", type=int, default=3000, help="KV blocks per replica (16 tokens each)")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--conversations", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16, help="conversations in flight at once")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-words", type=int, default=256, help="shared system prompt (1 token per word)")
    ap.add_argument("--document-words", type=int, default=4000, help="the document in turn 1")
    ap.add_argument("--documents", type=int, default=0,
                    help="distinct documents, shared round the conversations (conversation c reads document "
                         "c mod N: many users chatting about the same few documents); 0: each conversation "
                         "has its own")
    ap.add_argument("--user-words", type=int, default=48)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=8192, help="engine token budget per step")
    ap.add_argument("--long-prefill-threshold", type=int, default=0,
                    help="engine long_prefill_token_threshold: most tokens one sequence computes per step (0: no cap)")
    ap.add_argument("--policies", default="prefix_aware,round_robin")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script with --model")
    ap.add_argument("--no-stage-timing", action="store_true", help="do not ask for the stage stamps")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    model_dir = Path(args.model) if args.model else make_model(Path(tempfile.mkdtemp(prefix="routing-bench-")) / "llama-3b")
    words = single_token_words(model_dir)
    import os

    # One CPU unit per engine replica and the ingress (Serve's default asks), however few cores.
    ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, args.replicas + args.ingress_replicas + 1))
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    runs = {}
    for policy in args.policies.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] policy {policy} ...", flush=True)
        run = run_policy(policy, args, words, model_dir)
        runs[policy] = summarize(run)
        print(json.dumps({policy: runs[policy]}), flush=True)
    serve.shutdown()
    ray.shutdown()

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res = {
        "device": device, "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "setup": {k: v for k, v in vars(args).items() if k not in ("out", "port")},
        "model_shape": SHAPE_3B if not args.model else args.model,
        "policies": runs,
        "ttft_mean_ms": {p: r["ttft_mean_ms"] for p, r in runs.items()},
    }
    if "prefix_aware" in runs and "round_robin" in runs and runs["prefix_aware"]["ttft_mean_ms"]:
        res["ttft_roundrobin_over_prefix"] = runs["round_robin"]["ttft_mean_ms"] / runs["prefix_aware"]["ttft_mean_ms"]
        res["throughput_prefix_over_roundrobin"] = runs["prefix_aware"]["output_tok_s"] / runs["round_robin"]["output_tok_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace(" ", "_")
    (out / f"routing_{slug}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Routing on GPUs: prefix-aware vs round-robin ({device})", "",
             f"Command: `{res['command']}`; torch {torch.__version__}, Ray {ray.__version__}.", "",
             "| policy | mean TTFT ms | p50 | p90 | p99 | turn-1 mean | follow-up mean | output tok/s | prefix hit rate | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for p, r in runs.items():
        lines.append(f"| {p} | {f(r['ttft_mean_ms'])} | {f(r['ttft_p50_ms'])} | {f(r['ttft_p90_ms'])} | "
                     f"{f(r['ttft_p99_ms'])} | {f(r['ttft_first_turn_mean_ms'])} | {f(r['ttft_followup_mean_ms'])} | "
                     f"{f(r['output_tok_s'])} | {r['prefix_hit_rate']:.3f} | {r['errors']} |")
    if "ttft_roundrobin_over_prefix" in res:
        lines += ["", f"Mean TTFT round-robin / prefix-aware: **{res['ttft_roundrobin_over_prefix']:.2f}x**; "
                      f"output throughput prefix-aware / round-robin: {res['throughput_prefix_over_roundrobin']:.2f}x."]
    lines += stage_table(runs)
    (out / f"routing_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
