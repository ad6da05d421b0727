"""Tandem's engine: model code, paged KV cache, continuous batching, sampling, and the
prefill/decode worker roles. Public offline API shaped like vLLM's."""
from tandem.workers.llm import LLM
from tandem.workers.outputs import CompletionOutput, RequestOutput
from tandem.workers.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
