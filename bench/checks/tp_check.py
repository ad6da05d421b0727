"""Tensor-parallel correctness check (not a timed benchmark): tiny random models, fp32, the
offline `LLM(..., tensor_parallel_size=N)` against the same model at TP=1, greedy tokens. On CUDA
it runs with CUDA graphs (which must capture the NCCL all-reduces and the logits all-gather) and
eagerly, each under a large and a tiny token budget (decode graphs, mixed-step graphs, eager
chunks). `--device cpu` is the smoke run (gloo, no graphs).

    PYTHONPATH=$PWD python bench/checks/tp_check.py --device cuda --tp 2
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from tandem import LLM, SamplingParams
from tandem.engine.make_model import make_model


def _run(llm: LLM, prompts, max_tokens) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens])
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--archs", default="llama,qwen3,qwen3_moe")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rng = random.Random(0)
    lens = [1, 5, 16, 17, 31, 64, 100, 129] + ([256, 480] if args.device != "cpu" else [])
    failures = 0
    modes = [(False, 2048), (False, 32), (True, 2048)] if args.device != "cpu" else [(True, 2048)]
    for arch in args.archs.split(","):
        folder = str(make_model(tmp / arch, arch, seed=1))
        common = dict(device=args.device, dtype="float32", num_kv_blocks=256, max_model_len=1024)
        for eager, budget in modes:
            settings = dict(common, enforce_eager=eager, max_num_batched_tokens=budget)
            single = LLM(folder, **settings)
            vocab = single.engine.vocab_size
            prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in lens]
            max_tokens = [(7 * i) % 24 + 1 for i in range(len(prompts))]
            want, t1 = _run(single, prompts, max_tokens)
            del single
            with LLM(folder, tensor_parallel_size=args.tp, **settings) as llm:
                got, tn = _run(llm, prompts, max_tokens)
            same = sum(g == w for g, w in zip(got, want))
            print(f"{arch} tp={args.tp} eager={eager} budget={budget}: {same}/{len(prompts)} identical to tp=1 "
                  f"(wall {t1:.2f} s at tp=1, {tn:.2f} s at tp={args.tp}; tiny model, not a speed figure)",
                  flush=True)
            failures += same != len(prompts)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
