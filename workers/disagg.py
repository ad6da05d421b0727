"""Disaggregated prefill/decode inside one engine: the two hooks the engine calls, and the
messages the two roles exchange.

Decode side (`RemotePrefiller`, installed with `LLMEngine.enable_remote_prefill`): when the
scheduler admits a sequence whose uncached prompt suffix is long enough, it has already
attached the prefix hits and allocated blocks for the whole prompt; `start` registers the
uncached blocks with the `KVReceiver` and asks the prefill pool (a Serve `DeploymentHandle`)
for the prefill on the worker's asyncio loop. The sequence waits off the batch; `poll` hands
back what resolved (KV landed and the first token came back, or a failure), and the engine
either resumes it with the prompt computed or recomputes the rest of the prompt locally.

Prefill side (`KVExporter`, installed with `LLMEngine.enable_kv_export`): a request registered
with a destination stops after its first sampled token; its blocks past the decode side's
prefix hits go to the decode worker's block ids through a `KVSender`, and are freed (staying in
this worker's prefix cache) once the receiver acknowledged them.

Threads: `wants/start/cancel/poll` and `wants/export/is_done/discard` run on the engine
thread; `register/forget/pop_result` and the prefill call run on the worker's event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.kvtransfer import KVReceiver, KVSender, KVTransferConfig, ReceiveHandle, SendSession, TransferError
from tandem.workers.sampling_params import SamplingParams
from tandem.workers.sequence import Logprob, Sequence


@dataclass(frozen=True)
class DisaggConfig:
    """The decode worker's disaggregation settings, built once per replica."""

    remote_prefill_min_tokens: int = 64
    """An uncached prompt suffix at least this long is prefilled by the prefill pool; a shorter
    one is prefilled here."""
    prefill_timeout_s: float = 60.0
    """Bound on one prefill call (queueing + compute + transfer); then recompute locally."""
    kv_wait_timeout_s: float = 10.0
    """Bound on the KV landing after the prefill worker answered (it answers after the ack)."""

    def __post_init__(self) -> None:
        if self.remote_prefill_min_tokens < 1:
            raise ValueError("remote_prefill_min_tokens must be >= 1")
        if not (self.prefill_timeout_s > 0 and self.kv_wait_timeout_s > 0):
            raise ValueError("timeouts must be > 0")


def transfer_config(overrides: dict[str, Any] | None) -> KVTransferConfig:
    """A `KVTransferConfig` bound to this Ray node's address unless `overrides` says otherwise."""
    values = dict(overrides or {})
    if "bind_host" not in values:
        import ray

        values["bind_host"] = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return KVTransferConfig(**values)


# ------------------------------------------------------------------ messages between the roles
@dataclass
class PrefillRequest:
    """Decode → prefill: compute this prompt, send blocks [skip_blocks:] of it to
    `dst_block_ids` at `receiver_address`, return the first token. `prompt_token_ids` and
    `session_id` are what the prefill pool's request router reads."""

    transfer_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    receiver_address: str
    dst_block_ids: list[int]
    skip_blocks: int
    session_id: str | None = None


@dataclass
class PrefillResult:
    transfer_id: str
    first_token: int | None = None
    logprobs: dict[int, Logprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefill worker's own prefix cache
    error: str | None = None  # set: no usable KV; the decode worker recomputes


@dataclass
class PrefillOutcome:
    """How a remote prefill ended, as the decode engine sees it."""

    ok: bool
    first_token: int | None = None
    logprobs: dict[int, Logprob] | None = None
    reason: str = ""


@dataclass
class DisaggCounters:
    remote_prefills_started: int = 0
    remote_prefills_ok: int = 0
    remote_prefills_failed: int = 0  # recomputed locally
    remote_prefill_tokens: int = 0  # prompt tokens whose KV came over
    last_failure: str = ""


# ------------------------------------------------------------------------------ decode side
@dataclass(eq=False)
class _RemoteJob:
    seq: Sequence
    transfer_id: str
    handle: ReceiveHandle
    num_tokens: int  # uncached prompt tokens
    future: concurrent.futures.Future | None = None


class RemotePrefiller:
    """The decode engine's source of remote prefills (scheduler hook `RemotePrefillHook`)."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int, transfer: KVTransferConfig,
                 config: DisaggConfig, prefill_handle, wakeup: threading.Event) -> None:
        self.receiver = KVReceiver(kv_cache, transfer)
        self.config = config
        self.block_size = block_size
        self.num_layers = kv_cache.shape[0]
        self._prefill = prefill_handle
        self._wakeup = wakeup
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[str, _RemoteJob] = {}  # seq_key -> job; engine thread only
        self._resolved: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.counters = DisaggCounters()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the prefill calls run on (the Serve replica's)."""
        self._loop = loop

    # engine thread ------------------------------------------------------------------------
    def wants(self, seq: Sequence, num_uncached_tokens: int) -> bool:
        p = seq.sampling_params
        # Seeded sampling keeps a per-sequence generator here; n > 1 forks blocks here. Both
        # stay local so their outputs match colocated exactly.
        return (self._loop is not None and num_uncached_tokens >= self.config.remote_prefill_min_tokens
                and seq.num_preemptions == 0 and seq.num_output_tokens == 0 and p.n == 1 and p.seed is None)

    def start(self, seq: Sequence) -> None:
        skip_blocks = seq.num_computed_tokens // self.block_size  # the prefix hits
        dst_block_ids = list(seq.block_ids[skip_blocks:])
        transfer_id = f"{seq.seq_key}.{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.counters.remote_prefills_started += 1
        try:
            handle = self.receiver.expect(transfer_id, dst_block_ids, self.num_layers)
        except (ValueError, RuntimeError) as error:
            self._resolve(seq, PrefillOutcome(False, reason=f"expect failed: {error}"))
            return
        job = _RemoteJob(seq, transfer_id, handle, seq.num_tokens - seq.num_computed_tokens)
        self._jobs[seq.seq_key] = job
        request = PrefillRequest(transfer_id, list(seq.prompt_token_ids), seq.sampling_params,
                                 self.receiver.address, dst_block_ids, skip_blocks)
        job.future = asyncio.run_coroutine_threadsafe(self._run(job, request), self._loop)

    def cancel(self, seq: Sequence) -> None:
        """The request is gone: no KV may land in its blocks after this returns, and the prefill
        call is cancelled (which aborts it on the prefill worker, freeing its blocks there)."""
        job = self._jobs.pop(seq.seq_key, None)
        if job is None:
            return
        self.receiver.abort(job.transfer_id, "request cancelled")
        if job.future is not None:
            job.future.cancel()

    def poll(self) -> list[tuple[Sequence, PrefillOutcome]]:
        resolved = []
        while True:
            try:
                seq, outcome = self._resolved.get_nowait()
            except queue.Empty:
                return resolved
            job = self._jobs.pop(seq.seq_key, None)
            with self._lock:
                if outcome.ok:
                    self.counters.remote_prefills_ok += 1
                    self.counters.remote_prefill_tokens += job.num_tokens if job else 0
                else:
                    self.counters.remote_prefills_failed += 1
                    self.counters.last_failure = outcome.reason[:500]
            resolved.append((seq, outcome))

    # event loop ---------------------------------------------------------------------------
    async def _run(self, job: _RemoteJob, request: PrefillRequest) -> None:
        response = None
        try:
            response = self._prefill.prefill.remote(request)
            result: PrefillResult = await asyncio.wait_for(_awaited(response), self.config.prefill_timeout_s)
            if result.error is not None:
                raise RuntimeError(f"prefill worker: {result.error}")
            if result.transfer_id != job.transfer_id or result.first_token is None:
                raise RuntimeError("prefill worker answered for another transfer")
            await asyncio.to_thread(job.handle.wait, self.config.kv_wait_timeout_s)
            outcome = PrefillOutcome(True, result.first_token, result.logprobs)
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()
            raise
        except Exception as error:  # prefill died, timed out, refused, or the transfer failed
            if response is not None:
                response.cancel()
            # After this returns nothing more lands in the blocks: safe to recompute into them.
            self.receiver.abort(job.transfer_id, f"prefill failed: {error!r}"[:1000])
            outcome = PrefillOutcome(False, reason=repr(error))
        self._resolve(job.seq, outcome)

    def _resolve(self, seq: Sequence, outcome: PrefillOutcome) -> None:
        self._resolved.put((seq, outcome))
        self._wakeup.set()

    def close(self) -> None:
        self.receiver.close()


async def _awaited(response):
    return await response


# ----------------------------------------------------------------------------- prefill side
@dataclass
class KVDestination:
    receiver_address: str
    dst_block_ids: list[int]
    skip_blocks: int


@dataclass(eq=False)
class _Export:
    destination: KVDestination
    session: SendSession | None = None
    started: bool = False
    done: bool = False
    deadline: float = 0.0
    error: str | None = None


class KVExporter:
    """The prefill engine's hook: which requests stop after prefill, and where their KV goes."""

    def __init__(self, kv_cache: torch.Tensor, transfer: KVTransferConfig) -> None:
        self.sender = KVSender(kv_cache, transfer)
        self._deadline_s = 2 * transfer.timeout_s + transfer.connect_timeout_s
        self._lock = threading.Lock()
        self._exports: dict[str, _Export] = {}
        self.exports_ok = 0
        self.exports_failed = 0

    # event loop ---------------------------------------------------------------------------
    def register(self, request_id: str, destination: KVDestination) -> None:
        with self._lock:
            self._exports[request_id] = _Export(destination)

    def forget(self, request_id: str) -> None:
        """The caller left: drop a registration the engine has not started on (a started one
        is cleaned up by the engine's `discard`, after it aborted the request)."""
        with self._lock:
            export = self._exports.get(request_id)
            if export is not None and not export.started:
                del self._exports[request_id]

    def pop_result(self, request_id: str) -> str | None:
        """After the request finished: None if its KV was acknowledged, else why not."""
        with self._lock:
            export = self._exports.pop(request_id, None)
        if export is None or not export.done:
            return "the KV export did not run"
        return export.error

    # engine thread ------------------------------------------------------------------------
    def wants(self, seq: Sequence) -> bool:
        with self._lock:
            export = self._exports.get(seq.request_id)
            return export is not None and not export.started

    def export(self, seq: Sequence) -> None:
        with self._lock:
            export = self._exports[seq.request_id]
            export.started = True
        dest = export.destination
        try:
            # Only the blocks the decode worker does not hold; the first token's KV is computed
            # there by its first decode step.
            session = self.sender.begin(seq.request_id, dest.receiver_address,
                                        seq.block_ids[dest.skip_blocks:], dest.dst_block_ids)
            session.send_layers(0, session.num_layers)
            export.session = session
            export.deadline = time.monotonic() + self._deadline_s
        except (TransferError, ValueError, RuntimeError) as error:
            export.error = f"send failed: {error}"

    def is_done(self, seq: Sequence) -> bool:
        with self._lock:
            export = self._exports.get(seq.request_id)
        if export is None:
            return True
        session = export.session
        if session is not None and not session.done():
            if time.monotonic() < export.deadline:
                return False
            session.abort("no acknowledgement before the deadline")
        if session is not None and session.error is not None:
            export.error = str(session.error)
        export.done = True
        if export.error is None:
            self.exports_ok += 1
        else:
            self.exports_failed += 1
        return True

    def discard(self, seq: Sequence) -> None:
        with self._lock:
            export = self._exports.pop(seq.request_id, None)
        if export is not None and export.session is not None:
            export.session.abort("request aborted on the prefill worker")

    def close(self) -> None:
        self.sender.close()
