"""How much of a request's TTFT is the serving path, not the engine: a diagnostic script.

    python bench/ttft_path_probe.py --model DIR [--device cpu|cuda] [--requests 20]

Measures, one request at a time on an idle system and the same prompt:
1. the engine alone: `AsyncLLM.generate` in this process, request submitted -> first output;
2. the whole app over HTTP: the Serve app from `router.app.build_app` with one replica,
   streamed `/v1/chat/completions`, request sent -> first content chunk.
Prints the medians; the difference is what the HTTP proxy, the ingress (chat template,
tokenization, prefix hashing, routing) and the two Serve hops add to every request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "hello there how are you " * 20


def engine_ttft(model: str, device: str, n: int) -> float:
    from workers import SamplingParams
    from workers.async_engine import AsyncLLM
    from workers.config import EngineConfig
    from workers.llm_engine import LLMEngine

    llm = AsyncLLM(LLMEngine(EngineConfig(model=model, device=device)))
    tokenizer = llm.engine.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                           add_generation_prompt=True)

    async def run() -> list[float]:
        times = []
        for i in range(n + 3):
            t0 = time.perf_counter()
            async for _ in llm.generate({"prompt": prompt}, SamplingParams(max_tokens=2, temperature=0), f"p{i}"):
                times.append(time.perf_counter() - t0)
                break
            await asyncio.sleep(0.05)
        return times[3:]  # the first requests warm up

    times = asyncio.run(run())
    llm.shutdown()
    return statistics.median(times)


def http_ttft(model: str, device: str, n: int, port: int) -> float:
    import ray
    from ray import serve

    from bench.routing_gpu_bench import chat_stream
    from router.app import build_app

    ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 3))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "served_model_name": "m", "num_replicas": 1, "device": device}),
              name="ttft-probe", route_prefix="/")

    messages = [{"role": "user", "content": PROMPT}]
    times = [chat_stream(port, "m", messages, 2, 60.0)[0] for _ in range(n + 3)][3:]
    serve.shutdown()
    ray.shutdown()
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--port", type=int, default=8124)
    args = ap.parse_args()
    engine = engine_ttft(args.model, args.device, args.requests)
    served = http_ttft(args.model, args.device, args.requests, args.port)
    print(json.dumps({"engine_ttft_ms": engine * 1e3, "http_ttft_ms": served * 1e3,
                      "serving_path_ms": (served - engine) * 1e3}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
