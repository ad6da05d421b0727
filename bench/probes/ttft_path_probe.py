"""How much of a request's TTFT is the serving path, not the engine, stage by stage: a diagnostic.

    python bench/probes/ttft_path_probe.py --model DIR [--device cpu|cuda] [--requests 20] [--long-tokens 8000]

For two chat prompts (`short`: one user message; `long`: a multi-turn history of about
`--long-tokens` tokens plus a new user message, as a follow-up turn sends), one request at a
time on an idle system, each prompt sent again and again (so the engine's prefix cache holds
all but its last block, as for a follow-up turn whose history is cached):
1. the engine alone: `AsyncLLM.generate` in this process on the same token ids, submitted ->
   first output;
2. the whole app over HTTP: the Serve app from `workers.app.build_app` with one replica,
   streamed `/v1/chat/completions` with `"tandem_timing": true`, request sent -> first content
   chunk, and the reply's stage stamps (`router.stage_timing`).
Prints, per prompt, the median of each stage over `--requests` requests (after 3 warm-up ones):
where the HTTP TTFT goes between the proxy, the ingress (parse, chat template + tokenize,
WorkerRequest checks), the request router (hash, index actor), the Serve hops and the engine.
`--json PATH` writes the figures too. A model whose `max_position_embeddings` is below the long
prompt is copied to a temporary folder with the limit raised (random weights: only speed matters).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tandem.bench.routing_gpu_bench import chat_stream, single_token_words, stage_intervals, stage_medians

WARMUP = 3


def chat_prompts(model: str, long_tokens: int) -> dict[str, list[dict]]:
    """`short`: one user message; `long`: system + user/assistant turns of about `long_tokens`
    tokens (one token per word) + a short new user message."""
    words = single_token_words(Path(model))
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    history = [{"role": "system", "content": text(256)}]
    total = 256
    while total < long_tokens - 100:
        user = min(900, long_tokens - 100 - total)
        history += [{"role": "user", "content": text(user)}, {"role": "assistant", "content": text(64)}]
        total += user + 64 + 8
    history.append({"role": "user", "content": text(48)})
    return {"short": [{"role": "user", "content": "hello there how are you " * 20}], "long": history}


def long_context_model(model: str, max_len: int) -> str:
    """`model`, or a copy whose config allows `max_len` positions."""
    config = json.loads((Path(model) / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= max_len:
        return model
    folder = Path(tempfile.mkdtemp(prefix="ttft-probe-")) / Path(model).name
    shutil.copytree(model, folder)
    config["max_position_embeddings"] = max_len
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


def engine_ttft(model: str, device: str, prompts: dict[str, list[dict]], n: int, engine_kwargs: dict) -> dict:
    from tandem import SamplingParams
    from tandem.engine.async_engine import AsyncLLM
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine

    llm = AsyncLLM(LLMEngine(EngineConfig(model=model, device=device, **engine_kwargs)))
    tokenizer = llm.engine.tokenizer
    result = {}

    async def run(ids: list[int], kind: str) -> list[float]:
        times = []
        for i in range(n + WARMUP):
            t0 = time.perf_counter()
            async for _ in llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2, temperature=0),
                                        f"{kind}{i}"):
                times.append(time.perf_counter() - t0)
                break
            await asyncio.sleep(0.05)
        return times[WARMUP:]

    for kind, messages in prompts.items():
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        result[kind] = {"prompt_tokens": len(ids), "ttft_ms": statistics.median(asyncio.run(run(ids, kind))) * 1e3}
    llm.shutdown()
    return result


def http_ttft(model: str, device: str, prompts: dict[str, list[dict]], n: int, port: int,
              engine_kwargs: dict) -> dict:
    import ray
    from ray import serve

    from tandem.workers.app import build_app
    from tandem.router.stage_timing import STAMPS

    ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 3))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "served_model_name": "m", "num_replicas": 1, "device": device,
                         "engine_kwargs": engine_kwargs}), name="ttft-probe", route_prefix="/")
    result = {}
    for kind, messages in prompts.items():
        replies = [chat_stream(port, "m", messages, 2, 60.0, timing=True) for _ in range(n + WARMUP)][WARMUP:]
        result[kind] = {"prompt_tokens": replies[-1].prompt_tokens, "cached_tokens": replies[-1].cached_tokens,
                        "ttft_ms": statistics.median(r.ttft_s for r in replies) * 1e3,
                        "stages_ms": stage_medians([stage_intervals(r) for r in replies]),
                        "stamps_ms": stage_medians([r.timing["stamps_ms"] for r in replies], list(STAMPS))}
    serve.shutdown()
    ray.shutdown()
    return result


def table(engine: dict, served: dict) -> str:
    kinds = list(served)
    lines = ["| stage (median ms) | " + " | ".join(f"{k} ({served[k]['prompt_tokens']} tok)" for k in kinds) + " |",
             "| --- |" + " ---: |" * len(kinds)]
    stages = list(dict.fromkeys(s for k in kinds for s in served[k]["stages_ms"]))
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(
            f"{served[k]['stages_ms'][stage]:.2f}" if stage in served[k]["stages_ms"] else "" for k in kinds) + " |")
    lines.append("| engine alone TTFT | " + " | ".join(f"{engine[k]['ttft_ms']:.2f}" for k in kinds) + " |")
    lines.append("| HTTP TTFT - engine alone | " + " | ".join(
        f"{served[k]['ttft_ms'] - engine[k]['ttft_ms']:.2f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--long-tokens", type=int, default=8000, help="the long chat prompt's size; 0: short only")
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    prompts = chat_prompts(args.model, args.long_tokens)
    if not args.long_tokens:
        del prompts["long"]
    max_len = 1 << max(11, (args.long_tokens + 1024).bit_length())
    model = long_context_model(args.model, max_len) if args.long_tokens else args.model
    engine_kwargs = {"max_model_len": max_len} if args.long_tokens else {}
    engine = engine_ttft(model, args.device, prompts, args.requests, engine_kwargs)
    served = http_ttft(model, args.device, prompts, args.requests, args.port, engine_kwargs)
    result = {"command": "python " + " ".join(sys.argv), "requests": args.requests, "engine": engine, "http": served}
    print(json.dumps(result, indent=1))
    print(table(engine, served))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
