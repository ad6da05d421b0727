"""GPU correctness smoke run (not a timed benchmark): tiny random models, fp32, Tandem on CUDA
(Triton kernels + CUDA graphs, and eager) vs HF transformers on the same GPU, greedy tokens."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from tandem import LLM, SamplingParams
from tandem.engine.make_model import make_model


def main() -> int:
    import transformers

    tmp = Path(tempfile.mkdtemp())
    failures = 0
    for arch in ("llama", "qwen3"):
        folder = make_model(tmp / arch, arch, seed=1)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        rng = random.Random(0)
        lens = [1, 5, 16, 17, 31, 64, 100, 129, 256, 300, 480, 500]
        prompts = [[rng.randrange(5, hf.config.vocab_size) for _ in range(n)] for n in lens]
        maxt = [(7 * i) % 24 + 1 for i in range(len(prompts))]
        ref = []
        for p, m in zip(prompts, maxt):
            out = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=m, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long).cuda())
            ref.append(out[0, len(p):].tolist())
        for eager in (False, True):
            for budget in (2048, 32):
                llm = LLM(str(folder), device="cuda", dtype="float32", enforce_eager=eager,
                          max_num_batched_tokens=budget, num_kv_blocks=512, max_model_len=1024)
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [SamplingParams(temperature=0, max_tokens=m) for m in maxt])
                same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref))
                print(f"{arch} eager={eager} budget={budget}: {same}/{len(prompts)} identical to HF", flush=True)
                failures += same != len(prompts)
                del llm
                torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
