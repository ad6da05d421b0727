"""Tandem's in-process engine: requests in, tokens out. Models, paged KV cache (block manager
and prefix cache), scheduler (continuous batching, chunked prefill, preemption), sampler,
detokenizer, model runner (CUDA graphs), async engine, the offline `LLM`, the expert-parallel
group and the `KVConnector` port. Imports no Ray, Serve, router or `workers/` code."""
from tandem.engine.llm import LLM
from tandem.engine.outputs import CompletionOutput, RequestOutput
from tandem.protocol.sampling_params import SamplingParams, StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
