"""The offline API, shaped like vLLM's: `LLM(model_dir).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.engine.outputs import RequestOutput
from tandem.protocol.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", weights=None, runner_factory=None,
                 **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, **engine_kwargs), weights,
                                runner_factory)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion as one continuously-batched workload. All prompts are
        validated before any is admitted: one bad prompt raises and none run."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        validated = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                validated.append(self.engine.validate(prompt, p))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, request in zip(request_ids, validated):
            self.engine.add_validated(rid, request, stream=False)
        finished: dict[str, RequestOutput] = {}
        try:
            # Expert parallel: every rank steps (at least once, even with no prompts of its own)
            # until no rank of the group has requests; all stop on the same step.
            stepped = False
            while (len(finished) < len(request_ids) or self.engine.must_step()
                   or (self.engine.collective and not stepped)):
                stepped = True
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        finally:
            for rid in request_ids:  # on error/interrupt, free whatever is still in flight
                if rid not in finished:
                    self.engine.abort_request(rid)
        return [finished[rid] for rid in request_ids]
