"""The offline API, shaped like vLLM's: `LLM(model_dir).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence as Seq

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.engine.outputs import RequestOutput
from tandem.engine.tp_ranks import TensorParallelRanks
from tandem.protocol.sampling_params import SamplingParams


class LLM:
    """`tensor_parallel_size` > 1: the model is split over that many ranks (GPUs, or CPU
    processes on the CPU); this process is rank 0 and starts ranks 1..N-1 as child processes,
    which `shutdown()` (or garbage collection, or interpreter exit) stops."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", weights=None, runner_factory=None,
                 tensor_parallel_size: int = 1, **engine_kwargs) -> None:
        config = EngineConfig(model=model, device=device, dtype=dtype, **engine_kwargs)
        self._ranks: TensorParallelRanks | None = None
        self._ids = itertools.count()
        if tensor_parallel_size != 1:
            if runner_factory is not None or weights is not None:
                raise ValueError("tensor_parallel_size > 1 takes neither runner_factory nor weights "
                                 "(every rank loads its slice from the model folder)")
            self._ranks = TensorParallelRanks(config, tensor_parallel_size)
            weakref.finalize(self, self._ranks.shutdown)
            config, runner_factory = self._ranks.config, self._ranks.runner_factory
        try:
            self.engine = LLMEngine(config, weights, runner_factory)
        except BaseException as e:
            if self._ranks is None:
                raise
            self._ranks.shutdown()
            raise self._ranks.failure(e) from e

    @property
    def tensor_parallel_size(self) -> int:
        return self._ranks.world_size if self._ranks is not None else 1

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of tensor-parallel ranks 1..N-1 (none without tensor parallelism)."""
        return self._ranks.pids if self._ranks is not None else []

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks' processes (nothing to do without them). Idempotent."""
        if self._ranks is not None:
            self._ranks.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

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
            self.engine.runner.idle()  # tensor parallel: the other ranks wait outside the collectives
        except Exception as e:
            if self._ranks is None:
                raise
            raise self._ranks.failure(e) from e
        finally:
            for rid in request_ids:  # on error/interrupt, free whatever is still in flight
                if rid not in finished:
                    self.engine.abort_request(rid)
        return [finished[rid] for rid in request_ids]
