"""Host tier of the prefix cache: multi-turn chat whose working set is several times the device
KV pool, replayed through the offline engine with the host tier off and on, in one run.

    python bench/kv_tier_bench.py --device cuda --out bench/results   # Llama-3-8B shape, bf16, random weights
    python bench/kv_tier_bench.py --device cpu --out /tmp/kv_tier      # tiny random model, fp32 (smoke)

The workload: `--conversations` chats, each a shared system prompt + its own document + a question,
then `--turns - 1` follow-ups (previous prompt + the answer + a new user message). Turns are
replayed turn-major (every conversation's turn 0, then every turn 1, ...) with `--concurrency`
requests in flight (closed loop), so between two turns of one conversation all the others run one
turn each. The device pool is sized to 1/`--working-set-ratio` of the blocks all conversations
hold at the end (their last prompt and answer), so without the host tier every follow-up's history
has been evicted by the time it comes back and is prefilled again; with it, the history is copied
back from host memory. The host tier is sized to hold the whole working set (x1.25).

Figures per mode (`tier_off`, `tier_on`):
- `followup_ttft_mean_ms`, `followup_ttft_p99_ms`: turns >= 1, from the moment the request is
  handed to the engine to the step that returns its first token.
- `first_turn_ttft_mean_ms`: turn 0 (a miss in both modes, beyond the shared system prompt).
- `hit_rate_gpu`, `hit_rate_host`: prompt tokens served from the device prefix cache / from the
  host tier, over all prompt tokens of the replay.
- `throughput_out_tok_s`: output tokens of the replay / its wall time.
- the host tier's copies: bytes and GB/s each way (the copies' own durations, CUDA events).
`followup_ttft_off_over_on` is the issue's target figure (>= 3x). `no_reuse` replays unrelated
prompts (nothing to reuse, every evicted block still copied out) with the tier off and on:
`throughput_on_over_off` is the tier's cost where it cannot help (target: no loss).

Writes bench/results/kv_tier_<device>.json (`--out`).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocol.sampling_params import SamplingParams

CONFIG_8B = Path(__file__).parent / "configs" / "llama3_8b.json"


@dataclass(frozen=True)
class Shape:
    """The workload's sizes, in tokens."""

    conversations: int
    turns: int
    system_tokens: int
    document_tokens: tuple[int, int]
    question_tokens: int
    answer_tokens: int
    user_tokens: int
    concurrency: int
    block_size: int
    max_batched_tokens: int
    working_set_ratio: float
    no_reuse_requests: int


GPU_SHAPE = Shape(conversations=32, turns=4, system_tokens=256, document_tokens=(2048, 3072), question_tokens=64,
                  answer_tokens=128, user_tokens=64, concurrency=8, block_size=16, max_batched_tokens=2048,
                  working_set_ratio=4.0, no_reuse_requests=64)
CPU_SHAPE = Shape(conversations=6, turns=3, system_tokens=8, document_tokens=(24, 40), question_tokens=4,
                  answer_tokens=4, user_tokens=4, concurrency=2, block_size=4, max_batched_tokens=64,
                  working_set_ratio=4.0, no_reuse_requests=6)


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int = 0
    submitted: float = 0.0
    first_token: float | None = None


@dataclass
class ReplayResult:
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    output_tokens: int = 0
    outputs: dict[str, list[int]] = field(default_factory=dict)  # request id -> answer


# ------------------------------------------------------------------------------- the model
def random_weights(folder: Path, device: str, dtype: torch.dtype, seed: int = 0):
    """(name, tensor) pairs for every parameter of the folder's HF config, drawn on the device one
    at a time (an 8B model's weights are never held twice): norms 1, the rest N(0, 0.02)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in skeleton.named_parameters():
        if "norm" in name:
            yield name, torch.ones(param.shape, dtype=dtype, device=device)
        else:
            yield name, (torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)


def model_folder(device: str, tmp: Path) -> tuple[Path, bool]:
    """(folder, weights must be handed over): the 8B shape on a GPU, the tiny test model on CPU."""
    from tandem.engine.make_model import build_tokenizer, make_model

    if device.startswith("cuda"):
        import transformers

        folder = tmp / "llama3-8b-random"
        transformers.AutoConfig.from_pretrained(CONFIG_8B).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        return folder, True
    return make_model(tmp / "tiny-llama", "llama", seed=0), False


# ------------------------------------------------------------------------------- the workload
class Chat:
    """Seeded conversations: every token a pure function of (seed, conversation, turn)."""

    def __init__(self, shape: Shape, vocab_size: int, seed: int = 0) -> None:
        self.shape = shape
        rng = random.Random(f"system:{seed}")
        self.vocab = vocab_size
        self.system = self._tokens(rng, shape.system_tokens)
        self.seed = seed

    def _tokens(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(10, self.vocab - 10) for _ in range(n)]

    def first_prompt(self, conversation: int) -> list[int]:
        rng = random.Random(f"document:{self.seed}:{conversation}")
        document = self._tokens(rng, rng.randint(*self.shape.document_tokens))
        return self.system + document + self._tokens(rng, self.shape.question_tokens)

    def user_message(self, conversation: int, turn: int) -> list[int]:
        return self._tokens(random.Random(f"user:{self.seed}:{conversation}:{turn}"), self.shape.user_tokens)

    def max_prompt_tokens(self) -> int:
        s = self.shape
        return (s.system_tokens + s.document_tokens[1] + s.question_tokens
                + (s.turns - 1) * (s.answer_tokens + s.user_tokens))

    def working_set_blocks(self) -> int:
        """Blocks every conversation's final prompt and answer fill (upper bound)."""
        per = self.max_prompt_tokens() + self.shape.answer_tokens
        return self.shape.conversations * math.ceil(per / self.shape.block_size)


def replay_chat(engine: LLMEngine, chat: Chat) -> ReplayResult:
    """Turn-major, closed loop with `concurrency` in flight; a turn is submitted once the
    previous turn of its conversation has finished."""
    shape = chat.shape
    params = SamplingParams(temperature=0, max_tokens=shape.answer_tokens, ignore_eos=True, detokenize=False)
    histories = [chat.first_prompt(c) for c in range(shape.conversations)]
    queue = deque((t, c) for t in range(shape.turns) for c in range(shape.conversations))
    next_turn = [0] * shape.conversations
    in_flight: dict[str, Turn] = {}
    result = ReplayResult()
    t0 = time.perf_counter()
    while queue or in_flight:
        while len(in_flight) < shape.concurrency:
            busy = {turn.conversation for turn in in_flight.values()}
            pick = next(((t, c) for t, c in queue if c not in busy and next_turn[c] == t), None)
            if pick is None:
                break
            queue.remove(pick)
            t, c = pick
            rid = f"c{c}-t{t}"
            record = Turn(c, t, len(histories[c]), time.perf_counter())
            engine.add_request(rid, {"prompt_token_ids": histories[c]}, params)
            in_flight[rid] = record
            result.turns.append(record)
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = in_flight[out.request_id]
            if record.first_token is None and out.outputs[0].token_ids:
                record.first_token = now
            if out.finished:
                del in_flight[out.request_id]
                answer = list(out.outputs[0].token_ids)
                result.outputs[out.request_id] = answer
                result.output_tokens += len(answer)
                histories[record.conversation] = (histories[record.conversation] + answer
                                                  + chat.user_message(record.conversation, record.turn + 1))
                next_turn[record.conversation] += 1
    result.wall_s = time.perf_counter() - t0
    return result


def replay_no_reuse(engine: LLMEngine, chat: Chat) -> ReplayResult:
    """Unrelated prompts (no shared system prompt), all at once: nothing to reuse."""
    shape = chat.shape
    params = SamplingParams(temperature=0, max_tokens=shape.answer_tokens, ignore_eos=True, detokenize=False)
    rng = random.Random("no-reuse")
    result = ReplayResult()
    t0 = time.perf_counter()
    for i in range(shape.no_reuse_requests):
        n = rng.randint(*shape.document_tokens)
        engine.add_request(f"u{i}", {"prompt_token_ids": [rng.randrange(10, chat.vocab - 10) for _ in range(n)]},
                           params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result.output_tokens += len(out.outputs[0].token_ids)
    result.wall_s = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------- figures
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000.0 * value, 3)


def figures(chat_run: ReplayResult, before, after) -> dict:
    followups = [t.first_token - t.submitted for t in chat_run.turns if t.turn > 0 and t.first_token is not None]
    firsts = [t.first_token - t.submitted for t in chat_run.turns if t.turn == 0 and t.first_token is not None]
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    host_out = after.host_bytes_offloaded - before.host_bytes_offloaded
    host_in = after.host_bytes_reloaded - before.host_bytes_reloaded
    out_s = after.host_offload_seconds - before.host_offload_seconds
    in_s = after.host_reload_seconds - before.host_reload_seconds
    return {
        "followup_ttft_mean_ms": _ms(_mean(followups)),
        "followup_ttft_p99_ms": _ms(_p99(followups)),
        "first_turn_ttft_mean_ms": _ms(_mean(firsts)),
        "hit_rate_gpu": round((after.prefix_cache_hits - before.prefix_cache_hits) / queries, 4) if queries else 0.0,
        "hit_rate_host": round((after.host_cache_hits - before.host_cache_hits) / queries, 4) if queries else 0.0,
        "throughput_out_tok_s": round(chat_run.output_tokens / chat_run.wall_s, 1),
        "wall_s": round(chat_run.wall_s, 3),
        "requests": len(chat_run.turns),
        "followup_requests": len(followups),
        "preemptions": after.num_preemptions - before.num_preemptions,
        "host_gb_offloaded": round(host_out / 1e9, 4),
        "host_gb_reloaded": round(host_in / 1e9, 4),
        "host_offload_gb_s": round(host_out / out_s / 1e9, 2) if out_s > 0 else None,
        "host_reload_gb_s": round(host_in / in_s / 1e9, 2) if in_s > 0 else None,
        "host_offloads_skipped": after.host_offloads_skipped - before.host_offloads_skipped,
    }


def device_label(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


# ------------------------------------------------------------------------------- driver
def build_engine(folder: Path, hand_weights: bool, args, shape: Shape, num_blocks: int, host_gb: float) -> LLMEngine:
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    config = EngineConfig(model=str(folder), device=args.device, dtype="bfloat16" if gpu else "float32",
                          block_size=shape.block_size, num_kv_blocks=num_blocks,
                          max_num_batched_tokens=shape.max_batched_tokens, max_num_seqs=64,
                          max_model_len=8192 if gpu else 2048, host_kv_cache_gb=host_gb)
    weights = random_weights(folder, args.device, dtype, seed=args.seed) if hand_weights else None
    return LLMEngine(config, weights)


def warm_up(engine: LLMEngine, chat: Chat) -> None:
    """A few short requests (kernels compiled, graphs replayed once), then a cache reset."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    for i in range(2):
        engine.add_request(f"warm{i}", {"prompt_token_ids": [11 + i] * (3 * chat.shape.block_size + 1)}, params)
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    engine.reset_prefix_cache()


def run_mode(folder: Path, hand_weights: bool, args, chat: Chat, num_blocks: int,
             host_gb: float) -> tuple[dict, dict, dict[str, list[int]]]:
    t0 = time.perf_counter()
    engine = build_engine(folder, hand_weights, args, chat.shape, num_blocks, host_gb)
    started = time.perf_counter() - t0
    try:
        warm_up(engine, chat)
        before = engine.stats()
        chat_run = replay_chat(engine, chat)
        after = engine.stats()
        result = figures(chat_run, before, after)
        result["engine_start_s"] = round(started, 1)
        if engine.host_tier is not None:
            result["host_tier_blocks"] = engine.host_tier.num_blocks
        engine.reset_prefix_cache()
        plain = replay_no_reuse(engine, chat)
        no_reuse = {"throughput_out_tok_s": round(plain.output_tokens / plain.wall_s, 1),
                    "wall_s": round(plain.wall_s, 3)}
        return result, no_reuse, chat_run.outputs
    finally:
        engine.kv_connector.close()
        del engine
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--seed", type=int, default=0)
    for name in ("conversations", "turns", "concurrency", "answer_tokens", "user_tokens", "max_batched_tokens",
                 "no_reuse_requests"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--working-set-ratio", type=float, default=None,
                    help="the conversations' final working set / the device pool (3-5 in the issue)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    shape = GPU_SHAPE if gpu else CPU_SHAPE
    overrides = {k: v for k, v in vars(args).items() if k in Shape.__dataclass_fields__ and v is not None}
    shape = Shape(**{**shape.__dict__, **overrides})
    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python bench/kv_tier_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": shape.__dict__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder, hand_weights = model_folder(args.device, Path(tmp))
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(folder)
        chat = Chat(shape, hf_config.vocab_size, args.seed)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        bytes_per_block = (hf_config.num_hidden_layers * 2 * shape.block_size * hf_config.num_key_value_heads
                           * head_dim * (2 if gpu else 4))
        working_set = chat.working_set_blocks()
        request_blocks = math.ceil((chat.max_prompt_tokens() + shape.answer_tokens) / shape.block_size)
        # Never below what the requests in flight need at once (else the run measures preemption).
        num_blocks = max(math.ceil(working_set / shape.working_set_ratio), shape.concurrency * request_blocks + 1)
        host_gb = 1.25 * working_set * bytes_per_block / 1024**3
        results.update(num_kv_blocks=num_blocks, working_set_blocks=working_set,
                       working_set_over_pool=round(working_set / num_blocks, 2),
                       host_kv_cache_gb=round(host_gb, 3), kv_bytes_per_block=bytes_per_block)
        print(f"device pool {num_blocks} blocks, working set {working_set} blocks "
              f"({working_set / num_blocks:.1f}x), host tier {host_gb:.2f} GiB", flush=True)
        modes, no_reuse, answers = {}, {}, {}
        for mode, gb in (("tier_off", 0.0), ("tier_on", host_gb)):
            t0 = time.perf_counter()
            modes[mode], no_reuse[mode], answers[mode] = run_mode(folder, hand_weights, args, chat, num_blocks, gb)
            print(f"{mode}: {json.dumps(modes[mode])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results.update(modes)
    on, off = modes["tier_on"], modes["tier_off"]
    results["followup_ttft_off_over_on"] = (round(off["followup_ttft_mean_ms"] / on["followup_ttft_mean_ms"], 3)
                                            if on["followup_ttft_mean_ms"] else None)
    results["no_reuse"] = {**no_reuse, "throughput_on_over_off": round(
        no_reuse["tier_on"]["throughput_out_tok_s"] / no_reuse["tier_off"]["throughput_out_tok_s"], 3)}
    # Informational on a GPU: bf16 reductions over different batches may break a rounding tie
    # differently (the CPU tests check exact equality in float32).
    off_answers, on_answers = answers["tier_off"], answers["tier_on"]
    same = sum(off_answers[rid] == on_answers.get(rid) for rid in off_answers)
    results["answers_identical_fraction"] = round(same / len(off_answers), 4) if off_answers else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kv_tier_{device_label(args.device)}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"follow-up TTFT off/on {results['followup_ttft_off_over_on']}x; no-reuse throughput on/off "
          f"{results['no_reuse']['throughput_on_over_off']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
