"""`tandem generate`: offline generation with the Tandem engine. With no --model, it makes (once)
and uses the embedded default: a tiny random-weight Llama in ~/.cache/tandem/."""
from __future__ import annotations

import argparse

from tandem.engine.make_model import default_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: a tiny random Llama made on first use)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")


def run(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams

    model = args.model or default_model()
    prompts = args.prompt or ["Tandem serves large language models with"]
    llm = LLM(model, device=args.device, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        completion = out.outputs[0]
        print(f"prompt: {prompt!r}")
        print(f"output: {completion.text!r}  ({len(completion.token_ids)} tokens, {completion.finish_reason})")
    return 0
