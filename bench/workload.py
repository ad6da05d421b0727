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
