"""Structured output's cost on one device: decode step time with 0, 1, 16 and all requests of a
batch grammar-constrained (a simple and a complex JSON schema), the mask's own parts, and grammar
compile time.

    python bench/structured_output_bench.py --device cuda --out bench/results   # Llama-3-8B shape, bf16, 256 requests
    python bench/structured_output_bench.py --device cpu --out /tmp/so          # tiny shapes: a smoke run

The model has random weights (the mask, not the model, decides what is allowed) and a synthetic
byte-level vocabulary of the model's size (128,256 on the GPU: no model hub here; `--tokenizer DIR`
takes a real tokenizer folder instead), so the grammar library sees a vocabulary of realistic
size and token shapes. Each constrained request follows `{"type": "array", "items": SCHEMA,
"minItems": 1000000}`: the grammar walks SCHEMA's positions item after item and never allows EOS,
so every request stays in the batch for the timed steps (the others ignore EOS). All rows sample
at temperature 1 with their own seeds.

Per configuration: wall time per engine step over `--steps` back-to-back decode steps (overlap
scheduling on, as served; `--compare-no-overlap` adds runs with it off), the host time spent
filling masks (`StructuredOutputs.token_mask`: matcher catch-up, bitmask fill, copies queued) and
the device time of the mask kernel (CUDA events). Overhead = step time over the unconstrained
batch's, minus one. Alone, outside the engine: the batched mask fill for 1/16/256 matchers and
the kernel for 1/16/256 rows. Compile: a schema's first compile (our fix-ups included, xgrammar's
cache off) and a cached one; the tokenizer's one-off preparation.

Writes `structured_output_<device>.json` and `.md` to --out (device, versions, command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIG_8B = Path(__file__).parent / "configs" / "llama3_8b.json"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

SIMPLE = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0},
                   "active": {"type": "boolean"}},
    "required": ["name", "age", "active"], "additionalProperties": False,
}
COMPLEX = {
    "type": "object",
    "$defs": {
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 24}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
            "country": {"enum": ["US", "DE", "FR", "JP", "BR", "IN"]}},
            "required": ["street", "city", "zip", "country"], "additionalProperties": False},
    },
    "properties": {
        "id": {"type": "string", "pattern": "^[a-f0-9]{8}-[a-f0-9]{4}$"},
        "name": {"type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                 "required": ["first", "last"]},
        "email": {"type": "string", "format": "email"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer", "billing"]}, "maxItems": 4},
        "addresses": {"type": "array", "items": {"$ref": "#/$defs/address"}, "minItems": 1, "maxItems": 3},
        "contact": {"anyOf": [
            {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\+[0-9]{7,14}$"}},
             "required": ["phone"]},
            {"type": "object", "properties": {"pager": {"type": "integer"}}, "required": ["pager"]},
            {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}},
        "metadata": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "created": {"type": "string", "format": "date-time"},
    },
    "required": ["id", "name", "email", "age", "score", "roles", "addresses", "contact", "tags", "created"],
    "additionalProperties": False,
}
SCHEMAS = {"simple": SIMPLE, "complex": COMPLEX}


def endless(schema: dict) -> dict:
    """Items of `schema` for as long as the run lasts: the grammar never allows EOS. (Its `$defs`
    move to the root, where its references point.)"""
    item = {k: v for k, v in schema.items() if k != "$defs"}
    wrapped = {"type": "array", "items": item, "minItems": 1_000_000}
    return {"$defs": schema["$defs"], **wrapped} if "$defs" in schema else wrapped


# ------------------------------------------------------------------------------ set-up
def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map (the byte-level BPE alphabet)."""
    from tokenizers import pre_tokenizers

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    mapping = {b: chr(c) for b, c in zip(printable, chars)}
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return mapping


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: the 256 bytes, then generated
    tokens shaped like a real vocabulary's (words with and without a leading space, by English
    letter frequency; numbers; punctuation runs; whitespace runs; CJK, Cyrillic, Arabic, kana,
    Hangul), then the special tokens. It encodes by bytes only (no merges): prompts here are
    token ids, and the grammar library reads the vocabulary, not the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_chars = _byte_level_alphabet()

    def encode(text: str) -> str:
        return "".join(to_chars[b] for b in text.encode("utf-8"))

    rng = np.random.default_rng(seed)
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab.setdefault(to_chars[b], len(vocab))
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
                     1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    freq = freq / freq.sum()
    punct = np.array(list(".,;:!?()[]{}\"'-_/\\*&%$#@+=<>|~^`"))
    scripts = [(0x4E00, 0x9FFF), (0x0400, 0x04FF), (0x0600, 0x06FF), (0x3040, 0x30FF), (0xAC00, 0xD7A3)]
    target = vocab_size - len(SPECIAL_TOKENS)
    while len(vocab) < target:
        kind = rng.random()
        if kind < 0.62:
            word = "".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=freq))
            text = (" " if rng.random() < 0.6 else "") + (word.capitalize() if rng.random() < 0.15 else word)
        elif kind < 0.70:
            text = (" " if rng.random() < 0.3 else "") + "".join(rng.choice(list("0123456789"), size=int(rng.integers(1, 4))))
        elif kind < 0.82:
            text = (" " if rng.random() < 0.3 else "") + "".join(rng.choice(punct, size=int(rng.integers(1, 4))))
        elif kind < 0.86:
            text = "".join(rng.choice([" ", "\n", "\t"], size=int(rng.integers(1, 9))))
        else:
            lo, hi = scripts[int(rng.integers(len(scripts)))]
            text = "".join(chr(int(rng.integers(lo, hi))) for _ in range(int(rng.integers(1, 3))))
        vocab.setdefault(encode(text), len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", clean_up_tokenization_spaces=False)
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def build_model_folder(args, tmp: Path):
    """A model folder (config + tokenizer) and random weights, as (name, tensor) pairs."""
    import transformers

    from tandem.engine.make_model import build_config

    gpu = args.device.startswith("cuda")
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = synthetic_tokenizer(args.vocab_size or (128256 if gpu else 4096))
    vocab = len(tokenizer)
    if gpu:
        config = transformers.AutoConfig.from_pretrained(CONFIG_8B)
        config.vocab_size = max(vocab, config.vocab_size)
    else:
        config = build_config("llama", "tiny", vocab, tokenizer.bos_token_id or 0, tokenizer.eos_token_id,
                              tokenizer.pad_token_id or 0)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    folder = tmp / "model"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    with torch.device(args.device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.detach().to("cpu") for k, v in hf.state_dict().items()}
    del hf
    if gpu:
        torch.cuda.empty_cache()
    return folder, state, tokenizer


# ------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class MaskTimer:
    """Wraps the engine's mask fill (host time) and the mask kernel (CUDA events) to time them."""

    engine: object
    host_s: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)
    kernel_ms: list = dataclasses.field(default_factory=list)

    def install(self) -> None:
        from tandem.engine import sampler as sampler_mod

        structured = self.engine.structured
        real_mask = structured.token_mask

        def token_mask(seqs):
            t0 = time.perf_counter()
            out = real_mask(seqs)
            self.host_s.append(time.perf_counter() - t0)
            return out

        structured.token_mask = token_mask
        real_apply = sampler_mod.ops.apply_token_bitmask
        cuda = self.engine.runner.device.type == "cuda"

        def apply(logits, bitmask, rows):
            if not cuda:
                t0 = time.perf_counter()
                real_apply(logits, bitmask, rows)
                self.kernel_ms.append((time.perf_counter() - t0) * 1e3)
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            real_apply(logits, bitmask, rows)
            end.record()
            self.events.append((start, end))

        self._real = (structured, real_mask, real_apply)
        sampler_mod.ops.apply_token_bitmask = apply

    def uninstall(self) -> None:
        from tandem.engine import sampler as sampler_mod

        structured, real_mask, real_apply = self._real
        structured.token_mask = real_mask
        sampler_mod.ops.apply_token_bitmask = real_apply

    def reset(self) -> None:
        self.host_s.clear()
        self.events.clear()
        self.kernel_ms.clear()

    def kernel_times_ms(self) -> list[float]:
        if self.events:
            torch.cuda.synchronize()
            self.kernel_ms.extend(s.elapsed_time(e) for s, e in self.events)
            self.events.clear()
        return self.kernel_ms


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_batch(llm, args, num_constrained: int, spec, label: str, log) -> dict:
    """Decode steps of a full batch with `num_constrained` constrained rows."""
    from tandem import SamplingParams

    engine = llm.engine
    prompt_len, batch = args.prompt_len, args.batch
    budget = args.warmup + args.steps + 8
    rng = np.random.default_rng(1)
    vocab_hi = min(engine.vocab_size, 30000)
    for i in range(batch):
        prompt = {"prompt_token_ids": rng.integers(300, vocab_hi, prompt_len).tolist()}
        if i < num_constrained:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=budget, detokenize=False,
                                    structured_output=spec)
        else:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=budget, ignore_eos=True, detokenize=False)
        engine.add_request(f"{label}-{i}", prompt, params)
    timer = MaskTimer(engine)
    timer.install()
    try:
        # Prefill (chunked), then warm-up decode steps.
        for _ in range(10_000):
            engine.step()
            if all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) \
                    and len(engine.scheduler.running) == batch:
                break
        for _ in range(args.warmup):
            engine.step()
        sync(args.device)
        timer.reset()
        step_s = []
        t_all = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            step_s.append(time.perf_counter() - t0)
        sync(args.device)
        total = time.perf_counter() - t_all
        running = len(engine.scheduler.running)
        kernel = timer.kernel_times_ms()
        host = list(timer.host_s)
    finally:
        timer.uninstall()
        for rid in list(engine.requests):
            engine.abort_request(rid)
    return dict(
        constrained=num_constrained, batch=batch, running_at_end=running, steps=args.steps,
        step_ms=total / args.steps * 1e3, step_ms_median=statistics.median(step_s) * 1e3,
        mask_host_ms_per_step=sum(host) / args.steps * 1e3,
        mask_kernel_ms_per_step=sum(kernel) / args.steps if kernel else 0.0,
        overlap=engine.config.async_scheduling,
    )


def fill_microbench(compiled, tokenizer_vocab: int, counts: list[int], walk_steps: int = 24) -> list[dict]:
    """Batched mask fill alone, for k matchers each walked to a random position of the grammar."""
    import xgrammar as xgr

    out = []
    batch_matcher = xgr.BatchGrammarMatcher()
    for k in counts:
        rng = np.random.default_rng(k)
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(k)]
        bitmask = xgr.allocate_token_bitmask(k, tokenizer_vocab)
        times = []
        for step in range(walk_steps):
            t0 = time.perf_counter()
            batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
            times.append(time.perf_counter() - t0)
            words = bitmask.numpy().view(np.uint32)
            bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :tokenizer_vocab]
            for i, m in enumerate(matchers):
                allowed = np.flatnonzero(bits[i])
                assert m.accept_token(int(rng.choice(allowed)))
        out.append(dict(matchers=k, fill_ms_median=statistics.median(times) * 1e3, fill_ms_max=max(times) * 1e3))
    return out


def kernel_microbench(device: str, vocab: int, counts: list[int], batch: int) -> list[dict]:
    from tandem.kernels import ops

    out = []
    logits = torch.randn(batch, vocab, device=device, dtype=torch.float32)
    for k in counts:
        bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (k, -(-vocab // 32)), dtype=torch.int32, device=device)
        rows = torch.arange(k, device=device)
        with torch.inference_mode():
            for _ in range(3):
                ops.apply_token_bitmask(logits, bitmask, rows)
            sync(device)
            reps = 20
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    ops.apply_token_bitmask(logits, bitmask, rows)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / reps
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    ops.apply_token_bitmask(logits, bitmask, rows)
                ms = (time.perf_counter() - t0) / reps * 1e3
        out.append(dict(rows=k, kernel_ms=ms))
    return out


def compile_times(engine, tokenizer, reps: int) -> dict:
    """A first compile of each schema (xgrammar's cache off, our fix-ups included), a cached one,
    and the tokenizer's one-off preparation."""
    import xgrammar as xgr

    from tandem.engine.structured import build_grammar
    from tandem.protocol.sampling_params import StructuredOutput

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=engine.vocab_size,
                                              stop_token_ids=sorted(engine.eos_token_ids))
    result = {"tokenizer_info_ms": (time.perf_counter() - t0) * 1e3}
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    for name, schema in SCHEMAS.items():
        for variant, body in ((name, schema), (f"{name}_endless", endless(schema))):
            spec = StructuredOutput(json_schema=json.dumps(body))
            cold = []
            for _ in range(reps):
                t0 = time.perf_counter()
                compiler.compile_grammar(build_grammar(spec))
                cold.append(time.perf_counter() - t0)
            engine.grammars.compile(spec)
            t0 = time.perf_counter()
            engine.grammars.compile(spec)
            cached = time.perf_counter() - t0
            result[variant] = dict(first_compile_ms_median=statistics.median(cold) * 1e3,
                                   first_compile_ms_max=max(cold) * 1e3, cached_ms=cached * 1e3)
    return result


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--batch", type=int, default=None, help="requests in the batch (default 256 on GPU, 8 on CPU)")
    ap.add_argument("--constrained", default=None,
                    help="comma-separated counts of constrained requests (default 0,1,16,BATCH)")
    ap.add_argument("--schemas", default="simple,complex")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per request (default 128; CPU 16)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per run (default 64; CPU 6)")
    ap.add_argument("--warmup", type=int, default=None, help="decode steps before timing (default 8; CPU 2)")
    ap.add_argument("--vocab-size", type=int, default=None, help="synthetic vocabulary size (default: 128256 GPU, 4096 CPU)")
    ap.add_argument("--tokenizer", default=None, help="a real tokenizer folder instead of the synthetic vocabulary")
    ap.add_argument("--compare-no-overlap", action="store_true",
                    help="also run 0 and all constrained with async_scheduling off")
    ap.add_argument("--compile-reps", type=int, default=5)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (256 if gpu else 8)
    args.prompt_len = args.prompt_len or (128 if gpu else 16)
    args.steps = args.steps or (64 if gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (8 if gpu else 2)
    counts = ([int(c) for c in args.constrained.split(",")] if args.constrained
              else sorted({0, 1, min(16, args.batch), args.batch}))
    if any(not 0 <= c <= args.batch for c in counts):
        raise SystemExit("--constrained counts must be within [0, batch]")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    import triton
    import transformers
    import xgrammar

    from tandem import LLM, StructuredOutput
    from tandem.bench.engine_bench import device_tag

    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "xgrammar": getattr(xgrammar, "__version__", None) or _dist_version("xgrammar"),
        "python": platform.python_version(), "host_cpus": _cpu_count(),
        "command": "python bench/structured_output_bench.py " + " ".join(sys.argv[1:]),
        "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps, "warmup": args.warmup,
    }
    tmp = Path(tempfile.mkdtemp(prefix="tandem-so-bench-"))
    t0 = time.perf_counter()
    folder, state, tokenizer = build_model_folder(args, tmp)
    results["vocab_size"] = len(tokenizer)
    results["tokenizer"] = args.tokenizer or "synthetic byte-level"
    log(f"model folder and weights in {time.perf_counter() - t0:.0f}s (vocab {len(tokenizer)})")
    max_model_len = args.prompt_len + args.warmup + args.steps + 64
    sizing = {} if gpu else {"num_kv_blocks": 2 * args.batch * -(-max_model_len // 16)}
    llm = LLM(str(folder), device=args.device, dtype="bfloat16" if gpu else "float32", weights=state.items(),
              max_num_seqs=max(args.batch, 1), max_num_batched_tokens=8192 if gpu else 512,
              max_model_len=max_model_len, **sizing)
    del state
    engine = llm.engine
    results["num_kv_blocks"] = engine.block_manager.num_blocks
    log(f"engine up ({engine.block_manager.num_blocks} KV blocks)")

    results["compile"] = compile_times(engine, tokenizer, args.compile_reps)
    log(f"compile: {json.dumps(results['compile'])}")

    runs = []
    schemas = [s for s in args.schemas.split(",") if s]
    for name in schemas:
        spec = StructuredOutput(json_schema=json.dumps(endless(SCHEMAS[name])))
        for k in counts:
            row = run_batch(llm, args, k, spec, f"{name}-{k}", log)
            row["schema"] = name
            runs.append(row)
            log(f"{name} constrained {k}/{args.batch}: {row['step_ms']:.2f} ms/step, mask host "
                f"{row['mask_host_ms_per_step']:.3f} ms, kernel {row['mask_kernel_ms_per_step']:.4f} ms")
        if args.compare_no_overlap:
            engine.config = dataclasses.replace(engine.config, async_scheduling=False)
            for k in sorted({0, args.batch}):
                row = run_batch(llm, args, k, spec, f"{name}-{k}-sync", log)
                row["schema"] = name
                runs.append(row)
                log(f"{name} constrained {k}/{args.batch}, overlap off: {row['step_ms']:.2f} ms/step")
            engine.config = dataclasses.replace(engine.config, async_scheduling=True)
    for row in runs:
        base = next(r for r in runs if r["schema"] == row["schema"] and r["constrained"] == 0
                    and r["overlap"] == row["overlap"])
        row["overhead"] = row["step_ms"] / base["step_ms"] - 1.0 if base is not row else 0.0
    results["runs"] = runs

    compiled = {name: engine.grammars.compile(StructuredOutput(json_schema=json.dumps(endless(SCHEMAS[name]))))
                for name in schemas}
    fill_counts = sorted({1, min(16, args.batch), args.batch})
    results["fill"] = {name: fill_microbench(c, engine.vocab_size, fill_counts) for name, c in compiled.items()}
    results["kernel"] = kernel_microbench(args.device, engine.vocab_size, fill_counts, args.batch)
    log(f"fill: {json.dumps(results['fill'])}; kernel: {json.dumps(results['kernel'])}")
    write_reports(results, Path(args.out), gpu, device_tag)
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write_reports(results: dict, out: Path, gpu: bool, device_tag) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"structured_output_{device_tag(results['device'], gpu)}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Structured output cost on {results['device']}",
        "",
        f"torch {results['torch']}, triton {results['triton']}, xgrammar {results['xgrammar']}, "
        f"{results['host_cpus']} host CPUs. Command: `{results['command']}`.",
        f"Batch of {results['batch']} requests decoding (prompts {results['prompt_len']} tokens, random weights, "
        f"vocabulary {results['vocab_size']}: {results['tokenizer']}); {results['steps']} timed steps per run after "
        f"{results['warmup']} warm-up steps; constrained rows follow an endless array of the schema.",
        "",
        "| schema | constrained | overlap | step ms | overhead | mask fill (host) ms/step | mask kernel ms/step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        lines.append(f"| {r['schema']} | {r['constrained']}/{r['batch']} | {'on' if r['overlap'] else 'off'} | "
                     f"{r['step_ms']:.2f} | {r['overhead']:+.1%} | {r['mask_host_ms_per_step']:.3f} | "
                     f"{r['mask_kernel_ms_per_step']:.4f} |")
    lines += ["", "Target: overhead < 5% at every row constrained (overlap on).", "",
              "| grammar | first compile ms (median / max) | cached ms |", "| --- | --- | --- |"]
    c = results["compile"]
    for key, value in c.items():
        if isinstance(value, dict):
            lines.append(f"| {key} | {value['first_compile_ms_median']:.1f} / {value['first_compile_ms_max']:.1f} | "
                         f"{value['cached_ms']:.3f} |")
    lines += ["", f"Tokenizer preparation (once per engine): {c['tokenizer_info_ms']:.0f} ms.", "",
              "| schema | matchers | batched fill ms (median / max) |", "| --- | --- | --- |"]
    for schema, rows in results["fill"].items():
        for r in rows:
            lines.append(f"| {schema} | {r['matchers']} | {r['fill_ms_median']:.3f} / {r['fill_ms_max']:.3f} |")
    lines += ["", "| rows masked | kernel ms |", "| --- | --- |"]
    for r in results["kernel"]:
        lines.append(f"| {r['rows']} | {r['kernel_ms']:.4f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
