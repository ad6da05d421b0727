"""An in-process stand-in for disaggregation: a decode engine and a prefill engine in one thread,
their `KVConnector`s joined by plain tensor copies instead of kvtransfer and Serve.

`FakeDecodeConnector` (load half) puts each remote prefill in an outbox; `DisaggPair.step()`
steps both engines, hands new prefills to the prefill engine (registered with
`FakePrefillConnector`, whose save half copies each layer into the decode engine's blocks as the
forward pass computes it), and resolves a load when its prefill finished. Failures can be asked
for: `fail_prefills` (the prefill side answers with an error) and `fail_saves` (the save breaks
after its first layer). `log` records, in order, each layer computed and copied, for ordering
checks.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from tandem.engine.kv_connector import KVConnector, LoadResult
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.sequence import Sequence
from tandem.protocol.sampling_params import SamplingParams


@dataclass
class PendingPrefill:
    transfer_id: str
    seq: Sequence
    prompt_token_ids: list[int]
    params: SamplingParams
    dst_block_ids: list[int]
    skip_blocks: int


class FakeDecodeConnector(KVConnector):
    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = min_tokens
        self.outbox: list[PendingPrefill] = []
        self.loading: dict[str, PendingPrefill] = {}  # seq_key -> its prefill
        self.cancelled: list[str] = []  # transfer ids
        self._resolved: list[tuple[Sequence, LoadResult]] = []

    def bind(self, kv_cache: torch.Tensor, block_size: int, wakeup: threading.Event, kv_scales=()) -> None:
        self.kv_cache, self.block_size, self.wakeup = kv_cache, block_size, wakeup

    @property
    def loads(self) -> bool:
        return True

    def wants_load(self, seq: Sequence, num_uncached_tokens: int) -> bool:
        return num_uncached_tokens >= self.min_tokens and seq.num_preemptions == 0

    def start_load(self, seq: Sequence) -> None:
        skip = seq.num_computed_tokens // self.block_size
        job = PendingPrefill(f"{seq.seq_key}.t", seq, list(seq.prompt_token_ids), seq.sampling_params,
                             list(seq.block_ids[skip:]), skip)
        self.loading[seq.seq_key] = job
        self.outbox.append(job)

    def cancel_load(self, seq: Sequence) -> None:
        job = self.loading.pop(seq.seq_key, None)
        if job is not None:
            self.cancelled.append(job.transfer_id)

    def resolve(self, job: PendingPrefill, result: LoadResult) -> None:
        if self.loading.pop(job.seq.seq_key, None) is not None:
            self._resolved.append((job.seq, result))
            self.wakeup.set()

    def finished_loads(self) -> list[tuple[Sequence, LoadResult]]:
        out, self._resolved = self._resolved, []
        return out


@dataclass(eq=False)
class _Save:
    job: PendingPrefill
    src_block_ids: list[int] = field(default_factory=list)
    layers_copied: int = 0
    error: str | None = None


class FakePrefillConnector(KVConnector):
    def __init__(self, destination: torch.Tensor, log: list, fail_saves: bool = False) -> None:
        self.destination = destination  # the decode engine's KV cache
        self.log = log
        self.fail_saves = fail_saves
        self.registered: dict[str, _Save] = {}  # request id -> save
        self._in_step: list[_Save] = []
        self.cancelled: list[str] = []

    def bind(self, kv_cache: torch.Tensor, block_size: int, wakeup: threading.Event, kv_scales=()) -> None:
        self.kv_cache = kv_cache

    @property
    def saves(self) -> bool:
        return True

    def wants_save(self, seq: Sequence) -> bool:
        save = self.registered.get(seq.request_id)
        return save is not None and not save.src_block_ids

    def start_save(self, seq: Sequence) -> None:
        save = self.registered[seq.request_id]
        save.src_block_ids = list(seq.block_ids[save.job.skip_blocks:])
        self._in_step.append(save)

    def layer_computed(self, layer: int) -> None:
        self.log.append(("computed", layer))
        for save in self._in_step:
            if save.error is not None:
                continue
            if self.fail_saves and layer == 1:
                save.error = "link broke"
                continue
            src, dst = save.src_block_ids, save.job.dst_block_ids
            self.destination[layer][:, dst] = self.kv_cache[layer][:, src]
            save.layers_copied = layer + 1
            self.log.append(("copied", layer))

    def step_computed(self) -> None:
        self._in_step.clear()

    def save_done(self, seq: Sequence) -> bool:
        return True

    def cancel_save(self, seq: Sequence) -> None:
        self.cancelled.append(seq.request_id)


class DisaggPair:
    """A decode engine whose long prompts are prefilled by a prefill engine, in one thread."""

    def __init__(self, make_engine, min_tokens: int = 16, fail_prefills: bool = False,
                 fail_saves: bool = False) -> None:
        self.log: list = []
        self.decode_conn = FakeDecodeConnector(min_tokens)
        self.decode: LLMEngine = make_engine(self.decode_conn)
        self.prefill_conn = FakePrefillConnector(self.decode.runner.kv_cache, self.log, fail_saves)
        self.prefill: LLMEngine = make_engine(self.prefill_conn)
        self.fail_prefills = fail_prefills
        self._running: dict[str, PendingPrefill] = {}  # prefill request id -> job

    def step(self):
        outs = self.decode.step()
        for job in self.decode_conn.outbox:
            if self.fail_prefills:
                self.decode_conn.resolve(job, LoadResult(False, reason="prefill worker refused"))
                continue
            self.prefill_conn.registered[job.transfer_id] = _Save(job)
            self.prefill.add_request(job.transfer_id, {"prompt_token_ids": job.prompt_token_ids}, job.params)
            self._running[job.transfer_id] = job
        self.decode_conn.outbox.clear()
        for transfer_id in self.decode_conn.cancelled:  # the caller left: the prefill is aborted too
            if self._running.pop(transfer_id, None) is not None:
                self.prefill.abort_request(transfer_id)
                self.prefill_conn.registered.pop(transfer_id, None)
        self.decode_conn.cancelled.clear()
        for out in self.prefill.step():
            job = self._running.pop(out.request_id, None)
            if job is None or not out.finished:
                continue
            save = self.prefill_conn.registered.pop(out.request_id)
            num_layers = self.decode.runner.kv_cache.shape[0]
            if save.error is not None or save.layers_copied != num_layers:
                self.decode_conn.resolve(job, LoadResult(False, reason=save.error or "incomplete"))
            else:
                first = out.outputs[0]
                self.decode_conn.resolve(job, LoadResult(True, first.token_ids[0],
                                                         first.logprobs[0] if first.logprobs else None))
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        for i, prompt in enumerate(prompts):
            self.decode.add_request(str(i), {"prompt_token_ids": prompt}, params)
        done: dict[str, list[int]] = {}
        for _ in range(10_000):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            if len(done) == len(prompts):
                return [done[str(i)] for i in range(len(prompts))]
        raise AssertionError("the pair did not finish")

    def drain(self) -> None:
        for _ in range(1000):
            if not (self.decode.has_unfinished_requests() or self.prefill.has_unfinished_requests()):
                return
            self.step()
        raise AssertionError("requests left")
