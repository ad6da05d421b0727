"""The record behind choosing xgrammar (docs/STRUCTURED.md): xgrammar, llguidance and
outlines-core on one JSON schema and one tokenizer: set-up, compile, per-token mask time over
random walks, and how many finished walks are valid JSON that validates against the schema.

    pip install --target /tmp/alt llguidance outlines-core      # not project dependencies
    PYTHONPATH=/tmp/alt python bench/probes/grammar_library_probe.py TOKENIZER_DIR [--walks 30]

A random walk samples uniformly among the tokens the library allows, so it reaches the corners a
random-weight model reaches. Libraries that are not installed are skipped.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}


def allowed_ids(bitmask_row, vocab: int) -> np.ndarray:
    bits = np.unpackbits(np.ascontiguousarray(bitmask_row).view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def check(texts: list[str]) -> tuple[int, int]:
    import jsonschema

    invalid_json = invalid_schema = 0
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            invalid_json += 1
            continue
        try:
            jsonschema.validate(value, SCHEMA)
        except jsonschema.ValidationError:
            invalid_schema += 1
    return invalid_json, invalid_schema


def run_xgrammar(tokenizer, walks: int, limit: int) -> dict:
    import xgrammar as xgr

    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times, texts = [], []
    for seed in range(walks):
        matcher, rng, out = xgr.GrammarMatcher(grammar), random.Random(seed), []
        for _ in range(limit):
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t0)
            token = int(rng.choice(allowed_ids(bitmask[0].numpy(), vocab)))
            matcher.accept_token(token)
            if token == eos:
                texts.append(tokenizer.decode(out))
                break
            out.append(token)
    return dict(setup_ms=setup * 1e3, compile_ms=compile_s * 1e3, mask_us=1e6 * float(np.median(times)), texts=texts)


def run_llguidance(tokenizer, walks: int, limit: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    compile_s = time.perf_counter() - t0
    bitmask = lt.allocate_token_bitmask(1, vocab)
    times, texts = [], []
    for seed in range(walks):
        matcher, rng, out = llguidance.LLMatcher(lltok, grammar), random.Random(seed), []
        for _ in range(limit):
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - t0)
            token = int(rng.choice(allowed_ids(bitmask[0].numpy(), vocab)))
            matcher.consume_token(token)
            if token == eos:
                texts.append(tokenizer.decode(out))
                break
            out.append(token)
            if matcher.is_stopped():
                texts.append(tokenizer.decode(out))
                break
    return dict(setup_ms=setup * 1e3, compile_ms=compile_s * 1e3, mask_us=1e6 * float(np.median(times)), texts=texts)


def run_outlines(tokenizer, walks: int, limit: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core import json_schema as outlines_json

    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    pieces: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id != eos:
            pieces.setdefault(tokenizer.convert_ids_to_tokens(token_id), []).append(token_id)
    vocabulary = Vocabulary(eos, pieces)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = Index(outlines_json.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r""), vocabulary)
    compile_s = time.perf_counter() - t0
    times, texts = [], []
    for seed in range(walks):
        guide, rng, out = Guide(index), random.Random(seed), []
        for _ in range(limit):
            t0 = time.perf_counter()
            tokens = guide.get_tokens()
            times.append(time.perf_counter() - t0)
            token = rng.choice(tokens)
            if token == eos:
                texts.append(tokenizer.decode(out))
                break
            guide.advance(token)
            out.append(token)
    return dict(setup_ms=setup * 1e3, compile_ms=compile_s * 1e3, mask_us=1e6 * float(np.median(times)), texts=texts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer", help="a tokenizer folder (e.g. a model made by `tandem make-model`)")
    ap.add_argument("--walks", type=int, default=30)
    ap.add_argument("--limit", type=int, default=200, help="tokens per walk at most")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"vocabulary {len(tokenizer)}, {args.walks} walks")
    for name, run in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance), ("outlines-core", run_outlines)):
        try:
            r = run(tokenizer, args.walks, args.limit)
        except ImportError as error:
            print(f"{name:14s} not installed ({error})")
            continue
        bad_json, bad_schema = check(r["texts"])
        print(f"{name:14s} set-up {r['setup_ms']:8.1f} ms  compile {r['compile_ms']:8.2f} ms  mask "
              f"{r['mask_us']:7.1f} us/token  finished {len(r['texts'])}/{args.walks}  invalid JSON {bad_json}  "
              f"schema violations {bad_schema}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
