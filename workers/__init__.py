"""Tandem's engine: model code, paged KV cache, continuous batching, sampling, and the
prefill/decode worker roles. Public offline API shaped like vLLM's."""
from workers.llm import LLM
from workers.outputs import CompletionOutput, RequestOutput
from workers.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
