"""`tandem generate`: offline generation with the Tandem engine. With no --model, it makes (once)
and uses the embedded default: a tiny random-weight Llama in ~/.cache/tandem/."""
from __future__ import annotations

import argparse

from tandem.engine.config import KV_CACHE_DTYPES
from tandem.engine.make_model import default_model

DEFAULT_PROMPT = "Tandem serves large language models with"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: a tiny random Llama made on first use)")
    parser.add_argument("--prompt", action="append", help=f"prompt text, repeat for a batch (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a fresh one)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, "
                                                        "float16 or bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="what the KV cache stores: auto (the model dtype) or fp8 (e4m3, half the bytes; "
                             "a GPU of compute capability >= 8.9, or the CPU)")
    parser.add_argument("--quantization", choices=("fp8",), default=None,
                        help="fp8: e4m3 weights, quantized while loading a bf16/fp32 checkpoint (an FP8 "
                             "checkpoint loads as FP8 without it); default: none, the checkpoint's own format")


def run(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams
    from tandem.engine.config import check_device

    # Bad values fail here, before a model is made or loaded.
    check_device(args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    model = args.model or default_model()
    prompts = args.prompt or [DEFAULT_PROMPT]
    llm = LLM(model, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        completion = out.outputs[0]
        print(f"prompt: {prompt!r}")
        print(f"output: {completion.text!r}  ({len(completion.token_ids)} tokens, {completion.finish_reason})")
    return 0
