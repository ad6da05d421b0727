"""The serving path's own cost: TTFT and ITL of the same requests, engine alone vs through the app.

    python bench/serving_path_bench.py --device cpu [--out bench/results] [--repeats 3]
    python bench/serving_path_bench.py --device cuda        # Llama-3-8B shape, random weights

For each mode (`colocated`, `disaggregated`) one Serve app (`workers.app.build_app`, one
replica per pool) runs beside an `AsyncLLM` in this process built from the same engine config.
The same chat requests go to both, cell by cell and interleaved (engine first in even repeats,
the app first in odd ones), so the two sides of a ratio come from the same minutes of a noisy
machine:
- engine alone: `AsyncLLM.generate` on the chat-templated token ids, submitted -> outputs;
- through the app: the official `openai` client (`AsyncOpenAI`, streamed
  `/v1/chat/completions`, `"tandem_timing": true`), request sent -> content chunks.
Cells: prompt kind x concurrency. `short`: one user message; `long`: a multi-turn history of
about `--long-tokens` tokens plus a new user message. Every prompt is sent before it is measured
(warm-up), so a measured request finds all but its last block in the prefix cache, as a
follow-up turn whose history is cached. Concurrency c: c streams at once, each sending its
requests one after another (closed loop), `ignore_eos` so every request makes `--max-tokens`.

Per request: TTFT (to the first token), ITL (the time per output token after the first: last
token's time - first token's, over tokens - 1; a chunk carrying two tokens counts as two) and
the gaps between chunks; per cell, tokens per second over the cell's wall time; per app request,
the ingress's stage intervals (`router.stage_timing`), grouped into the path's stages (proxy and
client, ingress, request router incl. the prefix index call, Serve hops, engine queue, engine,
worker out, SSE write), p50 and p99.

Headline per mode, each the median over repeats with its min and max:
`ttft_overhead_ms_p50` (short prompt, 1 stream: app p50 TTFT - engine p50 TTFT),
`itl_overhead_ms_p50` (short, 1 stream: the same for ITL), `stream_tok_s_ratio_at_64` (short,
64 streams: app tokens/s / engine tokens/s). Writes `serving_path_<device>[_<label>].json` and
`.md` under `--out`, with device, versions, load average and the command.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.bench.routing_gpu_bench import single_token_words

CONFIG_8B = Path(__file__).parent / "configs" / "llama3_8b.json"
MODES = ("colocated", "disaggregated")
KINDS = ("short", "long")
WARMUP = 2  # requests per prompt kind and side before the measured cells
# The ingress's stage intervals (router.stage_timing.INTERVALS) grouped into the path's stages.
STAGE_GROUPS = {
    "proxy_and_client": ("client_outside_ingress",),
    "ingress_parse_template_tokenize": ("read_body", "parse", "template_tokenize", "prepare"),
    "request_router_incl_index": ("to_router", "hash", "route"),
    "serve_hop_to_worker": ("to_worker",),
    "engine_queue": ("engine_queue",),
    "engine_step": ("engine_wait", "engine_first_token"),
    "worker_out_detokenized_delta": ("worker_out",),
    "serve_hop_to_ingress": ("to_ingress",),
    "sse_write": ("respond",),
}


# ------------------------------------------------------------------------------------- prompts
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
    """`model`, or a copy whose config allows `max_len` positions (random weights: only speed matters)."""
    config = json.loads((Path(model) / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= max_len:
        return model
    folder = Path(tempfile.mkdtemp(prefix="serving-path-")) / Path(model).name
    shutil.copytree(model, folder)
    config["max_position_embeddings"] = max_len
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


def model_folder(device: str, tmp: Path, max_len: int) -> str:
    """The tiny test model on the CPU; on a GPU the Llama-3-8B shape with random bf16 weights
    written as safetensors (the Serve replicas load the folder), allowing `max_len` positions."""
    from tandem.engine.make_model import build_tokenizer, make_model

    if not device.startswith("cuda"):
        return str(make_model(tmp / "tiny-llama", "llama", seed=0))
    import torch
    import transformers

    folder = tmp / "llama3-8b-random"
    config = transformers.AutoConfig.from_pretrained(CONFIG_8B)
    config.max_position_embeddings = max(config.max_position_embeddings, max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    build_tokenizer().save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------ samples
@dataclass
class StreamSample:
    """One request, as its client saw it (seconds)."""

    ttft_s: float
    itl_s: float | None  # (last token - first token) / (tokens - 1)
    chunk_gaps_s: list[float]
    tokens: int
    stages_ms: dict[str, float] | None = None  # grouped stage intervals (app only)


def _sample(t0: float, token_times: list[tuple[float, int]], stages_ms=None) -> StreamSample:
    if not token_times:
        raise RuntimeError("the stream carried no token")
    tokens = sum(n for _, n in token_times)
    first, last = token_times[0][0], token_times[-1][0]
    itl = (last - first) / (tokens - 1) if tokens > 1 else None
    gaps = [b - a for (a, _), (b, _) in zip(token_times, token_times[1:])]
    return StreamSample(first - t0, itl, gaps, tokens, stages_ms)


async def engine_request(llm, ids: list[int], max_tokens: int, request_id: str) -> StreamSample:
    from tandem.protocol.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    token_times: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    async for out in llm.generate({"prompt_token_ids": ids}, params, request_id):
        n = len(out.outputs[0].delta_token_ids)
        if n:
            token_times.append((time.perf_counter(), n))
    return _sample(t0, token_times)


def grouped_stages(timing: dict, client_ttft_ms: float) -> dict[str, float]:
    intervals = dict(timing["intervals_ms"])
    sent = timing["stamps_ms"].get("first_token_sent")
    if sent is not None:
        intervals["client_outside_ingress"] = client_ttft_ms - sent
    grouped = {name: sum(intervals[i] for i in parts if i in intervals)
               for name, parts in STAGE_GROUPS.items() if any(i in intervals for i in parts)}
    grouped["ingress_total"] = intervals.get("ingress_total", float("nan"))
    return grouped


async def app_request(client, model: str, messages: list[dict], max_tokens: int) -> StreamSample:
    """One streamed chat completion through the official client. A token chunk is a choice
    delta with content (even empty) that is not the opening role chunk; its token count comes
    from the usage block at the end, spread over the chunks (one token per chunk unless the
    server coalesced several)."""
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "tandem_timing": True})
    chunk_times: list[float] = []
    timing = None
    completion_tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        extra = chunk.model_extra or {}
        if timing is None and "tandem_timing" in extra:
            timing = extra["tandem_timing"]
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.role is None and choice.delta.content is not None:
                chunk_times.append(now)
                break
    if not chunk_times:
        raise RuntimeError("the stream carried no token")
    # A chunk per token unless coalesced: the extra tokens sit in the chunks after the first,
    # which is what ITL divides by anyway.
    token_times = [(t, 1) for t in chunk_times]
    extra_tokens = completion_tokens - len(chunk_times)
    if extra_tokens > 0:
        token_times[-1] = (token_times[-1][0], 1 + extra_tokens)
    sample = _sample(t0, token_times)
    if timing is not None:
        sample.stages_ms = grouped_stages(timing, sample.ttft_s * 1e3)
    return sample


def bare_request(port: int, messages: list[dict], max_tokens: int) -> StreamSample:
    """One streamed chat completion over http.client: each SSE line parsed as it arrives."""
    import http.client

    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    chunk_times: list[float] = []
    completion_tokens = 0
    while line := resp.readline():
        if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
            continue
        now = time.perf_counter()
        chunk = json.loads(line[5:])
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("delta", {}).get("content") is not None and not c["delta"].get("role")
               for c in chunk.get("choices", [])):
            chunk_times.append(now)
    conn.close()
    token_times = [(t, 1) for t in chunk_times]
    if token_times and completion_tokens > len(chunk_times):
        token_times[-1] = (token_times[-1][0], 1 + completion_tokens - len(chunk_times))
    return _sample(t0, token_times)


async def closed_loop(concurrency: int, per_stream: int, one) -> tuple[list[StreamSample], float]:
    """`concurrency` streams, each sending `per_stream` requests in turn; (samples, wall s)."""
    async def stream(s: int) -> list[StreamSample]:
        return [await one(s, i) for i in range(per_stream)]

    t0 = time.perf_counter()
    per = await asyncio.gather(*(stream(s) for s in range(concurrency)))
    return [x for samples in per for x in samples], time.perf_counter() - t0


# -------------------------------------------------------------------------------------- stats
def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and every live process under it (this
    process and the local Ray cluster it started: raylet, proxy, replicas): a cell's CPU per token
    is a figure that other tenants of a shared machine do not move the way they move latency."""
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, seconds in used.items():
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        if p == root:
            total += seconds
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class SideStats:
    """One side (engine or app) of one cell."""

    requests: int
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    chunk_gap_ms_p50: float
    chunk_gap_ms_p99: float
    tok_s: float
    cpu_ms_per_token: float  # this process tree's CPU during the cell, per output token
    stages_ms_p50: dict[str, float] = field(default_factory=dict)
    stages_ms_p99: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, samples: list[StreamSample], wall_s: float, cpu_s: float) -> "SideStats":
        ttft = [s.ttft_s * 1e3 for s in samples]
        itl = [s.itl_s * 1e3 for s in samples if s.itl_s is not None]
        gaps = [g * 1e3 for s in samples for g in s.chunk_gaps_s]
        stages = [s.stages_ms for s in samples if s.stages_ms]
        names = list(dict.fromkeys(k for st in stages for k in st))
        return cls(len(samples), pct(ttft, 0.5), pct(ttft, 0.99), pct(itl, 0.5), pct(itl, 0.99), pct(gaps, 0.5),
                   pct(gaps, 0.99), sum(s.tokens for s in samples) / wall_s,
                   cpu_s * 1e3 / sum(s.tokens for s in samples),
                   {k: round(pct([st[k] for st in stages if k in st], 0.5), 4) for k in names},
                   {k: round(pct([st[k] for st in stages if k in st], 0.99), 4) for k in names})


@dataclass
class Cell:
    mode: str
    kind: str
    concurrency: int
    repeat: int
    prompt_tokens: int
    engine: SideStats
    app: SideStats
    # 1 stream only: the same requests through the app with a bare HTTP client (http.client, in
    # a thread), to separate the openai client's own cost from the server's.
    app_bare_client: SideStats | None = None


# ---------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class Plan:
    device: str
    modes: tuple[str, ...]
    kinds: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests: int  # per cell at concurrency 1; at c > 1 each stream sends ceil(requests / c), >= 1
    max_tokens: int
    repeats: int
    port: int

    def per_stream(self, concurrency: int) -> int:
        return max(1, math.ceil(self.requests / concurrency))


def engine_kwargs_for(device: str, max_len: int) -> dict:
    kwargs: dict = {"max_model_len": max_len, "max_num_seqs": 128}
    if device.startswith("cuda"):
        # Three engines share the GPU in disaggregated mode (this process's, prefill, decode).
        kwargs.update(dtype="bfloat16", num_kv_blocks=2048)
    return kwargs


def start_app(plan: Plan, model: str, mode: str, engine_kwargs: dict, app_args: dict) -> None:
    from ray import serve

    from tandem.workers.app import build_app

    gpus = 0.0
    if plan.device.startswith("cuda"):
        import torch

        # Disaggregated: a GPU per pool where there are two (NCCL pairs no two ranks on one GPU, so
        # a remote prefill between pools sharing one GPU cannot move its KV).
        gpus = 1.0 if mode == "colocated" or torch.cuda.device_count() >= 2 else 0.5
    serve.run(build_app({"model": model, "served_model_name": "m", "mode": mode, "num_replicas": 1,
                         "prefill_replicas": 1, "device": plan.device, "worker_num_gpus": gpus,
                         "max_in_flight": 1024, "engine_kwargs": engine_kwargs, **app_args}),
              name="serving-path", route_prefix="/")


def run_mode(plan: Plan, mode: str, llm, model: str, prompts: dict[str, list[dict]],
             prompt_ids: dict[str, list[int]], engine_kwargs: dict, app_args: dict, log) -> list[Cell]:
    from openai import AsyncOpenAI
    from ray import serve

    start_app(plan, model, mode, engine_kwargs, app_args)
    base_url = f"http://127.0.0.1:{plan.port}/v1"
    counter = iter(range(1 << 30))

    def engine_cell(kind: str, c: int, per_stream: int):
        return closed_loop(c, per_stream, lambda s, i: engine_request(
            llm, prompt_ids[kind], plan.max_tokens, f"{mode}-{kind}-{next(counter)}"))

    async def app_cell(kind: str, c: int, per_stream: int):
        client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600.0)
        try:
            return await closed_loop(c, per_stream, lambda s, i: app_request(
                client, "m", prompts[kind], plan.max_tokens))
        finally:
            await client.close()

    def bare_cell(kind: str, per_stream: int):
        async def one(s: int, i: int) -> StreamSample:
            result = await asyncio.to_thread(bare_request, plan.port, prompts[kind], plan.max_tokens)
            return result
        return closed_loop(1, per_stream, one)

    cells: list[Cell] = []
    try:
        for kind in plan.kinds:  # warm-up: compile paths, fill both prefix caches
            asyncio.run(engine_cell(kind, 1, WARMUP))
            asyncio.run(app_cell(kind, 1, WARMUP))
        for repeat in range(plan.repeats):
            for kind in plan.kinds:
                for c in plan.concurrency:
                    per = plan.per_stream(c)
                    order = ("engine", "app") if repeat % 2 == 0 else ("app", "engine")
                    measured = {}
                    for side in order:
                        run = engine_cell(kind, c, per) if side == "engine" else app_cell(kind, c, per)
                        cpu_before = tree_cpu_s(os.getpid())
                        samples, wall_s = asyncio.run(run)
                        measured[side] = SideStats.of(samples, wall_s, tree_cpu_s(os.getpid()) - cpu_before)
                    if c == 1:
                        cpu_before = tree_cpu_s(os.getpid())
                        samples, wall_s = asyncio.run(bare_cell(kind, per))
                        measured["bare"] = SideStats.of(samples, wall_s, tree_cpu_s(os.getpid()) - cpu_before)
                    cell = Cell(mode, kind, c, repeat, len(prompt_ids[kind]), measured["engine"], measured["app"],
                                measured.get("bare"))
                    cells.append(cell)
                    log(f"{mode} {kind} c={c} r={repeat}: TTFT p50 engine {cell.engine.ttft_ms_p50:.2f} app "
                        f"{cell.app.ttft_ms_p50:.2f} ms; ITL p50 engine {cell.engine.itl_ms_p50:.3f} app "
                        f"{cell.app.itl_ms_p50:.3f} ms; tok/s engine {cell.engine.tok_s:.0f} app {cell.app.tok_s:.0f}")
    finally:
        serve.delete("serving-path")
    return cells


# ------------------------------------------------------------------------------------ summary
def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def headline(cells: list[Cell], mode: str, kind: str = "short") -> dict:
    """The issue's three figures for one mode, each over repeats."""
    def at(c: int) -> list[Cell]:
        return [x for x in cells if x.mode == mode and x.kind == kind and x.concurrency == c]

    result: dict = {}
    one = at(1)
    if one:
        result["ttft_overhead_ms_p50"] = spread([x.app.ttft_ms_p50 - x.engine.ttft_ms_p50 for x in one])
        result["itl_overhead_ms_p50"] = spread([x.app.itl_ms_p50 - x.engine.itl_ms_p50 for x in one])
        result["engine_ttft_ms_p50"] = spread([x.engine.ttft_ms_p50 for x in one])
        result["engine_itl_ms_p50"] = spread([x.engine.itl_ms_p50 for x in one])
        bare = [x for x in one if x.app_bare_client is not None]
        if bare:
            result["ttft_overhead_ms_p50_bare_client"] = spread([x.app_bare_client.ttft_ms_p50 - x.engine.ttft_ms_p50
                                                                 for x in bare])
            result["itl_overhead_ms_p50_bare_client"] = spread([x.app_bare_client.itl_ms_p50 - x.engine.itl_ms_p50
                                                                for x in bare])
    top = at(64)
    if top:
        result["stream_tok_s_ratio_at_64"] = spread([x.app.tok_s / x.engine.tok_s for x in top])
        result["path_cpu_ms_per_token_at_64"] = spread([x.app.cpu_ms_per_token - x.engine.cpu_ms_per_token
                                                        for x in top])
    return result


def per_cell_summary(cells: list[Cell]) -> list[dict]:
    """Each (mode, kind, concurrency): the median over repeats of every figure, with overheads."""
    rows = []
    keys = list(dict.fromkeys((c.mode, c.kind, c.concurrency) for c in cells))
    for mode, kind, conc in keys:
        group = [c for c in cells if (c.mode, c.kind, c.concurrency) == (mode, kind, conc)]
        med = lambda f: round(statistics.median(f(c) for c in group), 4)  # noqa: E731
        stage_names = list(dict.fromkeys(k for c in group for k in c.app.stages_ms_p50))
        rows.append({
            "mode": mode, "kind": kind, "concurrency": conc, "prompt_tokens": group[0].prompt_tokens,
            "repeats": len(group),
            "engine_ttft_ms_p50": med(lambda c: c.engine.ttft_ms_p50), "app_ttft_ms_p50": med(lambda c: c.app.ttft_ms_p50),
            "engine_ttft_ms_p99": med(lambda c: c.engine.ttft_ms_p99), "app_ttft_ms_p99": med(lambda c: c.app.ttft_ms_p99),
            "ttft_overhead_ms_p50": spread([c.app.ttft_ms_p50 - c.engine.ttft_ms_p50 for c in group]),
            "engine_itl_ms_p50": med(lambda c: c.engine.itl_ms_p50), "app_itl_ms_p50": med(lambda c: c.app.itl_ms_p50),
            "engine_itl_ms_p99": med(lambda c: c.engine.itl_ms_p99), "app_itl_ms_p99": med(lambda c: c.app.itl_ms_p99),
            "itl_overhead_ms_p50": spread([c.app.itl_ms_p50 - c.engine.itl_ms_p50 for c in group]),
            "app_chunk_gap_ms_p50": med(lambda c: c.app.chunk_gap_ms_p50),
            "engine_tok_s": med(lambda c: c.engine.tok_s), "app_tok_s": med(lambda c: c.app.tok_s),
            "tok_s_ratio": spread([c.app.tok_s / c.engine.tok_s for c in group]),
            **({"bare_client_ttft_ms_p50": med(lambda c: c.app_bare_client.ttft_ms_p50),
                "bare_client_itl_ms_p50": med(lambda c: c.app_bare_client.itl_ms_p50)}
               if all(c.app_bare_client is not None for c in group) else {}),
            "engine_cpu_ms_per_token": med(lambda c: c.engine.cpu_ms_per_token),
            "app_cpu_ms_per_token": med(lambda c: c.app.cpu_ms_per_token),
            "stages_ms_p50": {k: med(lambda c: c.app.stages_ms_p50.get(k, float("nan"))) for k in stage_names},
            "stages_ms_p99": {k: med(lambda c: c.app.stages_ms_p99.get(k, float("nan"))) for k in stage_names},
        })
    return rows


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "transformers", "openai", "fastapi", "pydantic", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name().lower().replace(" ", "_").replace("-", "_")


def markdown(result: dict) -> str:
    lines = [f"# Serving path cost: through the app vs the engine alone ({result['device']})", "",
             f"Command: `{result['command']}`", "",
             f"Load average (1/5/15 min) at start {result['load_average_start']}, at end {result['load_average_end']}; "
             f"{result['cpu_count']} CPUs; versions {result['versions']}; app args {result['app_args']}, "
             f"Serve environment {result['serve_env']}.", "",
             "Headline per mode (short prompt; median over repeats [min, max]):", "",
             "| mode | TTFT overhead p50 (ms), 1 stream | ITL overhead p50 (ms), 1 stream | app/engine tok/s at 64 "
             "| path CPU ms per token at 64 | TTFT / ITL overhead p50 with a bare HTTP client (ms) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(d: dict | None, digits: int = 2) -> str:
        return "" if not d else f"{d['median']:.{digits}f} [{d['min']:.{digits}f}, {d['max']:.{digits}f}]"

    for mode, h in result["modes"].items():
        lines.append(f"| {mode} | {fmt(h.get('ttft_overhead_ms_p50'))} | {fmt(h.get('itl_overhead_ms_p50'), 3)} | "
                     f"{fmt(h.get('stream_tok_s_ratio_at_64'), 3)} | {fmt(h.get('path_cpu_ms_per_token_at_64'), 3)} | "
                     f"{fmt(h.get('ttft_overhead_ms_p50_bare_client'))} / {fmt(h.get('itl_overhead_ms_p50_bare_client'), 3)} |")
    lines += ["", "Per cell (medians over repeats):", "",
              "| mode | prompt | streams | TTFT p50 engine / app (ms) | TTFT p99 engine / app | ITL p50 engine / app (ms) "
              "| ITL p99 engine / app | tok/s engine / app | CPU ms/token engine / app |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["cells"]:
        lines.append(f"| {r['mode']} | {r['kind']} ({r['prompt_tokens']} tok) | {r['concurrency']} | "
                     f"{r['engine_ttft_ms_p50']:.2f} / {r['app_ttft_ms_p50']:.2f} | "
                     f"{r['engine_ttft_ms_p99']:.2f} / {r['app_ttft_ms_p99']:.2f} | "
                     f"{r['engine_itl_ms_p50']:.3f} / {r['app_itl_ms_p50']:.3f} | "
                     f"{r['engine_itl_ms_p99']:.3f} / {r['app_itl_ms_p99']:.3f} | "
                     f"{r['engine_tok_s']:.0f} / {r['app_tok_s']:.0f} | "
                     f"{r['engine_cpu_ms_per_token']:.3f} / {r['app_cpu_ms_per_token']:.3f} |")
    stages = list(dict.fromkeys(k for r in result["cells"] for k in r["stages_ms_p50"]))
    lines += ["", "Where the app's TTFT goes (ms, p50 / p99 over the cell's requests, median over repeats):", "",
              "| mode | prompt | streams | " + " | ".join(stages) + " |", "| --- | --- | ---: |" + " ---: |" * len(stages)]
    for r in result["cells"]:
        lines.append(f"| {r['mode']} | {r['kind']} | {r['concurrency']} | " + " | ".join(
            f"{r['stages_ms_p50'].get(s, float('nan')):.2f} / {r['stages_ms_p99'].get(s, float('nan')):.2f}"
            for s in stages) + " |")
    lines += ["", "Stages: `proxy_and_client` = client TTFT - the ingress's first_token_sent (HTTP proxy both ways, "
              "uvicorn, the openai client); `ingress_parse_template_tokenize` = read_body + parse + template_tokenize + "
              "prepare; `request_router_incl_index` = to_router + hash + route (the index actor's round trip); "
              "`engine_step` = engine_wait + engine_first_token; `sse_write` = respond (router/stage_timing.py). "
              "CPU ms/token: CPU time of this process and the local Ray cluster under it during the cell, per output "
              "token (both sides include the idle other side); path CPU = app - engine.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", help="a model folder (default: the tiny model on cpu, the 8B shape on cuda)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=16, help="per cell at 1 stream")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=None,
                    help="the long prompt's size (default 8000 on cuda, 1500 on cpu: the tiny model's 2048 positions)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--label", default="", help="appended to the file names (e.g. before)")
    ap.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the local Ray cluster (every Serve process, the HTTP proxy "
                    "included), e.g. RAY_SERVE_PROXY_USE_GRPC=1; repeatable")
    ap.add_argument("--app-args", default="{}", help="JSON merged into the app's args (workers.app.AppArgs), "
                    'e.g. \'{"serve_low_latency": false}\'')
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    kinds = tuple(args.kinds.split(","))
    if set(modes) - set(MODES) or set(kinds) - set(KINDS):
        ap.error(f"--modes from {MODES}, --kinds from {KINDS}")
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    app_args = json.loads(args.app_args)
    long_tokens = args.long_tokens if args.long_tokens is not None else (8000 if args.device.startswith("cuda") else 1500)
    plan = Plan(args.device, modes, kinds, concurrency, args.requests, args.max_tokens, args.repeats, args.port)
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    import ray
    from ray import serve

    from tandem.engine.async_engine import AsyncLLM
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine

    tmp = Path(tempfile.mkdtemp(prefix="serving-path-"))
    max_len = 1 << max(11, (long_tokens + args.max_tokens + 512).bit_length())
    model = args.model or model_folder(args.device, tmp, max_len)
    model = long_context_model(model, max_len)
    engine_kwargs = engine_kwargs_for(args.device, max_len)
    prompts = chat_prompts(model, long_tokens)
    llm = AsyncLLM(LLMEngine(EngineConfig(model=model, device=args.device, **engine_kwargs)))
    tokenizer = llm.engine.tokenizer
    prompt_ids = {kind: tokenizer.encode(tokenizer.apply_chat_template(prompts[kind], tokenize=False,
                                                                       add_generation_prompt=True),
                                         add_special_tokens=False) for kind in kinds}
    serve_env = dict(item.split("=", 1) for item in args.serve_env)
    os.environ.update(serve_env)  # before ray.init: the raylet and every worker inherit them
    ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 4), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    cells: list[Cell] = []
    try:
        for mode in modes:
            log(f"mode {mode}: starting the app")
            cells += run_mode(plan, mode, llm, model, prompts, prompt_ids, engine_kwargs, app_args, log)
    finally:
        llm.shutdown()
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serving_path", "device": device_name(args.device), "versions": versions(),
        "command": "python " + " ".join(sys.argv), "cpu_count": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "unix_time": int(time.time()), "plan": asdict(plan), "long_tokens": long_tokens, "app_args": app_args,
        "serve_env": serve_env,
        "modes": {mode: headline(cells, mode) for mode in modes},
        "cells": per_cell_summary(cells),
        "runs": [asdict(c) for c in cells],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serving_path_{'cpu' if not args.device.startswith('cuda') else result['device']}"
    stem += f"_{args.label}" if args.label else ""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
