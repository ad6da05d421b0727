"""The offline engine benchmark's seeded workload, shared by the benchmark, its throughput bound
and the step profile (so each regenerates exactly the run's requests)."""
from __future__ import annotations

import random


def make_workload(num: int, lo: int, hi: int, mean_out: int, cap: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(num):
        prompts.append([rng.randrange(10, vocab - 10) for _ in range(rng.randint(lo, hi))])
        outs.append(max(1, min(cap, int(rng.expovariate(1.0 / mean_out)))))
    return prompts, outs


def fixed_workload(num: int, input_len: int, output_len: int, vocab: int, seed: int = 0):
    """`num` random prompts of exactly `input_len` tokens, each asking for `output_len` tokens
    (as `vllm bench throughput --input-len/--output-len` and trtllm-bench's fixed-length sets)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(input_len)] for _ in range(num)]
    return prompts, [output_len] * num


# A ShareGPT-shaped length distribution, without the dataset: log-normal prompt and answer lengths
# with heavy right tails and medians of a couple of hundred tokens, filtered as vLLM's benchmark
# filters ShareGPT (prompt and answer >= 4 tokens, prompt <= 1024, prompt + answer <= 2048). The
# parameters are chosen to resemble the dataset's shape, not fitted to it.
SHAREGPT_PROMPT_MEDIAN, SHAREGPT_PROMPT_SIGMA = 170, 1.0
SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_SIGMA = 150, 0.9


def sharegpt_shaped_workload(num: int, vocab: int, seed: int = 0, scale: float = 1.0):
    """`num` requests with ShareGPT-shaped lengths (above); `scale` shrinks every length (and the
    filters) for small smoke runs."""
    import math

    rng = random.Random(seed)
    max_prompt, max_total = max(4, int(1024 * scale)), max(8, int(2048 * scale))
    prompts, outs = [], []
    while len(prompts) < num:
        p = int(rng.lognormvariate(math.log(SHAREGPT_PROMPT_MEDIAN * scale), SHAREGPT_PROMPT_SIGMA))
        o = int(rng.lognormvariate(math.log(SHAREGPT_OUTPUT_MEDIAN * scale), SHAREGPT_OUTPUT_SIGMA))
        if p < 4 or o < 4 or p > max_prompt or p + o > max_total:
            continue
        prompts.append([rng.randrange(10, vocab - 10) for _ in range(p)])
        outs.append(o)
    return prompts, outs
