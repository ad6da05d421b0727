"""The two roles' `KVConnector`s (the engine's port, `engine.kv_connector`) over `kvtransfer`.

Decode side (`DecodeConnector`): when the scheduler admits a sequence whose uncached prompt
suffix is long enough, it has already attached the prefix hits and allocated blocks for the
whole prompt; `start_load` registers the uncached blocks with the `KVReceiver` and asks the
prefill pool (a Serve `DeploymentHandle`) for the prefill on the worker's asyncio loop. The
sequence waits for KV off the batch; `finished_loads` hands back what resolved (KV landed and the
first token came back, or a failure), and the engine either resumes it with the prompt computed
or recomputes the rest of the prompt locally.

Prefill side (`PrefillConnector`): a request registered with a destination is saved: in the
step whose chunk completes its prompt, the blocks past the decode side's prefix hits go to the
decode worker's block ids through a `KVSender`, layer by layer as the forward pass computes them
(`stream_layers`; or all layers after the forward, the baseline), coalesced into large messages.
The request stops after its first sampled token, and its blocks are freed (staying in this
worker's prefix cache) once the receiver acknowledged them.

Threads: the connector methods run on the engine thread; `bind_loop`, `register`, `forget`,
`pop_result`, `counters` and the prefill call run on the worker's event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from tandem.engine.kv_connector import KVConnector, LoadResult
from tandem.engine.sequence import Sequence
from tandem.kvtransfer import KVReceiver, KVSender, KVTransferConfig, ReceiveHandle, SendSession, TransferError
from tandem.kvtransfer.metrics import TransferMetrics
from tandem.protocol.prefill import PrefillAlive, PrefillRequest, PrefillResult


@dataclass(frozen=True)
class DisaggConfig:
    """The decode worker's disaggregation settings, built once per replica."""

    remote_prefill_min_tokens: int = 64
    """An uncached prompt suffix at least this long is prefilled by the prefill pool; a shorter
    one is prefilled here."""
    prefill_timeout_s: float = 60.0
    """Bound on one prefill call (queueing + compute + transfer); then recompute locally. A
    transfer the receiver fails (the sender went silent for the transfer config's
    `peer_timeout_s`, its pair broke, a bad chunk) ends the wait at once."""
    kv_wait_timeout_s: float = 10.0
    """Bound on the KV landing after the prefill worker answered, and on its answer (the first
    token) after the KV landed: it answers once the receiver acknowledged the KV."""
    prefill_liveness_timeout_s: float = 10.0
    """Bound on silence from the prefill replica working on a request: it sends a `PrefillAlive`
    every quarter of this while the request queues, computes or sends there. This is what frees
    the blocks of a replica that hangs before it sent any KV (frozen, its event loop stuck),
    which the transfer's heartbeat cannot see: nothing has begun. A call that waits this long in
    Serve's queue for a prefill replica (every one at `max_ongoing_requests`) is given up the
    same way: the prompt is prefilled here instead."""
    prefill_tensor_parallel_size: int = 1
    """The prefill pool's degree: its ranks each send their KV heads, one part each here."""

    def __post_init__(self) -> None:
        if self.remote_prefill_min_tokens < 1:
            raise ValueError("remote_prefill_min_tokens must be >= 1")
        if type(self.prefill_tensor_parallel_size) is not int or self.prefill_tensor_parallel_size < 1:
            raise ValueError("prefill_tensor_parallel_size must be an integer >= 1")
        if not (self.prefill_timeout_s > 0 and self.kv_wait_timeout_s > 0 and self.prefill_liveness_timeout_s > 0):
            raise ValueError("timeouts must be > 0")


def transfer_config(overrides: dict[str, Any] | None) -> KVTransferConfig:
    """A `KVTransferConfig` bound to this Ray node's address unless `overrides` says otherwise."""
    values = dict(overrides or {})
    if "bind_host" not in values:
        import ray

        values["bind_host"] = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return KVTransferConfig(**values)


@dataclass
class DisaggCounters:
    remote_prefills_started: int = 0
    remote_prefills_ok: int = 0
    remote_prefills_failed: int = 0  # recomputed locally
    remote_prefill_tokens: int = 0  # prompt tokens whose KV came over
    last_failure: str = ""


# ------------------------------------------------------------------------------ decode side
@dataclass(eq=False)
class _Load:
    seq: Sequence
    transfer_id: str
    handle: ReceiveHandle
    num_tokens: int  # uncached prompt tokens
    future: concurrent.futures.Future | None = None
    dst_block_ids: list[int] = dataclasses.field(default_factory=list)


class DecodeConnector(KVConnector):
    """The decode engine's loads: prompts prefilled by the prefill pool, KV received here."""

    def __init__(self, transfer: KVTransferConfig, config: DisaggConfig, prefill_handle) -> None:
        self.config = config
        self._transfer = transfer
        self._prefill = prefill_handle
        self.receiver: KVReceiver | None = None  # made in `bind`, when the KV cache exists
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loads: dict[str, _Load] = {}  # seq_key -> load; engine thread only
        self._resolved: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._counters = DisaggCounters()
        self._ranks: list | None = []  # tensor parallel: (actor, receiver address) of ranks 1..N-1

    def bind(self, kv_cache: torch.Tensor, block_size: int, wakeup: threading.Event,
             kv_scales: list[float] | tuple[float, ...] = ()) -> None:
        from tandem.kvtransfer import plan_head_parts
        from tandem.kvtransfer.tp_plan import parts_for_dst
        from tandem.workers.tp_disagg import rank_kv_heads

        self.receiver = KVReceiver(kv_cache, self._transfer, kv_scales)
        self.block_size = block_size
        self.num_layers = kv_cache.shape[0]
        self._wakeup = wakeup
        self._plan_parts([(0, kv_cache.shape[4])])

    def _plan_parts(self, rank_heads: list[tuple[int, int]]) -> None:
        """Each rank's expected parts: one per prefill rank holding heads its cache needs."""
        from tandem.kvtransfer import plan_head_parts
        from tandem.kvtransfer.tp_plan import parts_for_dst
        from tandem.workers.tp_disagg import rank_kv_heads

        num_kv_heads = rank_heads[-1][1]
        parts = plan_head_parts(rank_kv_heads(num_kv_heads, self.config.prefill_tensor_parallel_size), rank_heads)
        self._rank_heads = rank_heads
        self._head_ranges = [parts_for_dst(parts, rank) for rank in range(len(rank_heads))]

    def use_tensor_parallel(self, runner) -> None:
        """Rank 0 of a tensor-parallel decode group: every rank receives its heads; the other
        ranks' receivers are reached through their actors (`attach_ranks`)."""
        from tandem.workers.tp_disagg import rank_kv_heads

        self._plan_parts(rank_kv_heads(runner.hf_config.num_key_value_heads, runner.tp.world_size))
        self._ranks = None  # no remote prefill until the ranks are attached

    def attach_ranks(self, actors: list) -> None:
        """The actors of ranks 1..N-1 (`workers.tp_replica.TensorParallelRank`), each with a
        `DecodeFollower`."""
        import ray

        addresses = ray.get([actor.kv_address.remote() for actor in actors], timeout=60)
        self._ranks = list(zip(actors, addresses))

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the prefill calls run on (the Serve replica's)."""
        self._loop = loop

    def counters(self) -> DisaggCounters:
        with self._lock:
            return dataclasses.replace(self._counters)

    @property
    def transfer_config(self) -> KVTransferConfig:
        return self._transfer

    def transfer_metrics(self) -> TransferMetrics:
        return self.receiver.metrics()

    # engine thread ------------------------------------------------------------------------
    @property
    def loads(self) -> bool:
        return True

    def wants_load(self, seq: Sequence, num_uncached_tokens: int) -> bool:
        p = seq.sampling_params
        # Seeded sampling keeps a per-sequence generator here; n > 1 forks blocks here. Both
        # stay local so their outputs match colocated exactly.
        return (self._loop is not None and self._ranks is not None
                and num_uncached_tokens >= self.config.remote_prefill_min_tokens
                and seq.num_preemptions == 0 and seq.num_output_tokens == 0 and p.n == 1 and p.seed is None)

    def start_load(self, seq: Sequence) -> None:
        skip_blocks = seq.num_computed_tokens // self.block_size  # the prefix hits
        dst_block_ids = list(seq.block_ids[skip_blocks:])
        transfer_id = f"{seq.seq_key}.{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._counters.remote_prefills_started += 1
        try:
            handle = self.receiver.expect(transfer_id, dst_block_ids, self.num_layers, self._head_ranges[0])
        except (ValueError, RuntimeError) as error:
            self._resolve(seq, LoadResult(False, reason=f"expect failed: {error}"))
            return
        load = _Load(seq, transfer_id, handle, seq.num_tokens - seq.num_computed_tokens)
        self._loads[seq.seq_key] = load
        request = PrefillRequest(transfer_id, list(seq.prompt_token_ids), seq.sampling_params,
                                 self.receiver.address, dst_block_ids, skip_blocks,
                                 keepalive_s=self.config.prefill_liveness_timeout_s / 4)
        if self._ranks:
            request.receiver_addresses = [self.receiver.address] + [address for _, address in self._ranks]
            request.dst_kv_heads = list(self._rank_heads)
        load.dst_block_ids = dst_block_ids
        load.future = asyncio.run_coroutine_threadsafe(self._run(load, request), self._loop)

    def cancel_load(self, seq: Sequence) -> None:
        """The request is gone: no KV may land in its blocks after this returns, and the prefill
        call is cancelled (which aborts it on the prefill worker, freeing its blocks there)."""
        load = self._loads.pop(seq.seq_key, None)
        if load is None:
            return
        self.receiver.abort(load.transfer_id, "request cancelled")
        if self._ranks:
            import ray

            # Synchronously: the blocks are freed (and reused) on every rank once this returns.
            ray.get([actor.kv_abort.remote(load.transfer_id, "request cancelled") for actor, _ in self._ranks],
                    timeout=30)
        if load.future is not None:
            load.future.cancel()

    def finished_loads(self) -> list[tuple[Sequence, LoadResult]]:
        resolved = []
        while True:
            try:
                seq, result = self._resolved.get_nowait()
            except queue.Empty:
                return resolved
            load = self._loads.pop(seq.seq_key, None)
            with self._lock:
                if result.ok:
                    self._counters.remote_prefills_ok += 1
                    self._counters.remote_prefill_tokens += load.num_tokens if load else 0
                else:
                    self._counters.remote_prefills_failed += 1
                    self._counters.last_failure = result.reason[:500]
            resolved.append((seq, result))

    # event loop ---------------------------------------------------------------------------
    async def _run(self, load: _Load, request: PrefillRequest) -> None:
        """Ask for the prefill and wait for both its answer and the KV. The blocks stay reserved
        for the transfer until whichever comes first of: both arrived (resume with the prompt
        computed); the call failed (the prefill replica died, refused, timed out, or sent not
        even a keep-alive for `prefill_liveness_timeout_s`: hung before any KV); the receiver
        failed the transfer (sender silent or gone: `peer_timeout_s`); the KV landed but no
        answer came within `kv_wait_timeout_s`, or an answer came but no KV within it. In
        every failure the transfer is aborted first, so the rest of the prompt can be
        recomputed into the same blocks."""
        loop = asyncio.get_running_loop()
        config = self.config
        rank0_ended = loop.create_future()  # the receiver ended the transfer (landed or failed)
        load.handle.add_done_callback(lambda: _set_soon(loop, rank0_ended))
        ranks = self._ranks or []
        response = answer = kv_ended = None
        try:
            # Every rank expects its heads before any prefill rank can send them.
            await asyncio.gather(*(actor.kv_expect.remote(load.transfer_id, load.dst_block_ids, self.num_layers,
                                                          self._head_ranges[rank])
                                   for rank, (actor, _) in enumerate(ranks, start=1)))
            kv_ended = asyncio.ensure_future(self._all_landed(rank0_ended, load, ranks))
            response = self._prefill.options(stream=True).prefill_stream.remote(request)
            answer = asyncio.ensure_future(_answer(response, config.prefill_liveness_timeout_s))
            done, _ = await asyncio.wait({answer, kv_ended}, timeout=config.prefill_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError(f"no prefill within prefill_timeout_s={config.prefill_timeout_s:g}s")
            if answer not in done:  # the KV ended first: failed (raises here), or landed
                kv_ended.result()
                done, _ = await asyncio.wait({answer}, timeout=config.kv_wait_timeout_s)
                if not done:
                    raise TimeoutError(f"the KV landed but the prefill worker did not answer within "
                                       f"kv_wait_timeout_s={config.kv_wait_timeout_s:g}s")
            result: PrefillResult = answer.result()
            if result.error is not None:
                raise RuntimeError(f"prefill worker: {result.error}")
            if result.transfer_id != load.transfer_id or result.first_token is None:
                raise RuntimeError("prefill worker answered for another transfer")
            done, _ = await asyncio.wait({kv_ended}, timeout=config.kv_wait_timeout_s)
            if not done:
                raise TimeoutError(f"the KV did not land within kv_wait_timeout_s={config.kv_wait_timeout_s:g}s "
                                   "of the prefill worker's answer")
            kv_ended.result()  # raises if the transfer failed
            outcome = LoadResult(True, result.first_token, result.logprobs)
        except asyncio.CancelledError:
            _cancel(response, answer, kv_ended)
            raise
        except Exception as error:  # prefill died, timed out, refused, or the transfer failed
            _cancel(response, answer, kv_ended)
            # After this returns nothing more lands in the blocks: safe to recompute into them.
            reason = f"prefill failed: {error!r}"[:1000]
            self.receiver.abort(load.transfer_id, reason)
            await asyncio.gather(*(actor.kv_abort.remote(load.transfer_id, reason) for actor, _ in ranks),
                                 return_exceptions=True)
            outcome = LoadResult(False, reason=repr(error))
        self._resolve(load.seq, outcome)

    async def _all_landed(self, rank0_ended: asyncio.Future, load: _Load, ranks: list) -> None:
        """Returns once every rank's heads landed; raises once one rank's transfer failed."""
        await rank0_ended
        load.handle.wait(0)  # raises if rank 0's failed
        errors = await asyncio.gather(*(actor.kv_wait.remote(load.transfer_id, self.config.prefill_timeout_s)
                                        for actor, _ in ranks))
        failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors, start=1) if error]
        if failed:
            raise TransferError(load.transfer_id, "; ".join(failed))

    def _resolve(self, seq: Sequence, result: LoadResult) -> None:
        self._resolved.put((seq, result))
        self._wakeup.set()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()


async def _answer(stream, liveness_s: float) -> PrefillResult:
    """The prefill stream's result, its `PrefillAlive`s skipped; raises `TimeoutError` once the
    stream stayed silent for `liveness_s`."""
    while True:
        try:
            item = await asyncio.wait_for(stream.__anext__(), liveness_s)
        except TimeoutError:
            raise TimeoutError(f"the prefill replica sent nothing for prefill_liveness_timeout_s={liveness_s:g}s "
                               "(hung?)") from None
        except StopAsyncIteration:
            raise RuntimeError("the prefill stream ended without a result") from None
        if not isinstance(item, PrefillAlive):
            return item


def _set_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    """From any thread: resolve `future` on `loop` (a closed loop: nobody waits any more)."""
    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        pass


def _cancel(response, answer: asyncio.Future | None, kv_ended: asyncio.Future | None = None) -> None:
    if kv_ended is not None:
        kv_ended.cancel()
    if answer is not None:
        answer.cancel()
    if response is not None:
        response.cancel()


# ----------------------------------------------------------------------------- prefill side
@dataclass
class KVDestination:
    """Where a save goes: `receiver_address` (a decode replica of degree 1), or one receiver
    per decode rank (`receiver_addresses`) with the global KV-head range [lo, hi) each rank's
    cache holds (`dst_kv_heads`); the blocks are the same ids on every decode rank."""

    receiver_address: str
    dst_block_ids: list[int]
    skip_blocks: int
    receiver_addresses: list[str] | None = None
    dst_kv_heads: list[tuple[int, int]] | None = None

    def receivers(self, num_kv_heads: int) -> tuple[list[str], list[tuple[int, int]]]:
        addresses = self.receiver_addresses or [self.receiver_address]
        heads = [tuple(h) for h in self.dst_kv_heads] if self.dst_kv_heads else [(0, num_kv_heads)]
        if len(heads) != len(addresses):
            raise ValueError(f"{len(addresses)} decode receivers but {len(heads)} KV-head ranges")
        return addresses, heads


@dataclass(eq=False)
class _Save:
    request_id: str
    destination: KVDestination
    sessions: list[SendSession] = dataclasses.field(default_factory=list)  # this rank's
    followers: list[int] = dataclasses.field(default_factory=list)  # tensor-parallel ranks sending too
    started: bool = False
    done: bool = False
    deadline: float = 0.0
    error: str | None = None


class PrefillConnector(KVConnector):
    """The prefill engine's saves: which requests stop after prefill, where their KV goes, and
    the layer-by-layer send during the forward pass that completes their prompt."""

    def __init__(self, transfer: KVTransferConfig, stream_layers: bool = True) -> None:
        self._transfer = transfer
        self.stream_layers = stream_layers
        self.sender: KVSender | None = None  # made in `bind`, when the KV cache exists
        self._deadline_s = 2 * transfer.timeout_s + transfer.connect_timeout_s
        self._lock = threading.Lock()
        self._saves: dict[str, _Save] = {}
        self._in_step: list[_Save] = []  # saves whose prompt completes in the step being run
        self.exports_ok = 0
        self.exports_failed = 0
        # Tensor parallelism (`use_tensor_parallel`): each rank's global KV heads, the group's
        # store and prefix (where followers report), and the ops for the next step's message.
        self._rank_heads: list[tuple[int, int]] | None = None
        self._group_store = None
        self._group_prefix = ""
        self._follower_ops: list[dict] = []
        self._orphan_reports: list[tuple[str, int]] = []  # (request, rank) of cancelled saves

    def bind(self, kv_cache: torch.Tensor, block_size: int, wakeup: threading.Event,
             kv_scales: list[float] | tuple[float, ...] = ()) -> None:
        self.sender = KVSender(kv_cache, self._transfer, kv_scales)
        self._num_kv_heads = kv_cache.shape[4]

    def use_tensor_parallel(self, runner) -> None:
        """This engine is rank 0 of a tensor-parallel group (`runner`, its
        `TensorParallelModelRunner`): saves are planned over every rank's heads, the followers'
        parts go out in the steps' lockstep messages (`workers.tp_disagg`)."""
        from tandem.workers.tp_disagg import rank_kv_heads

        self._rank_heads = rank_kv_heads(runner.hf_config.num_key_value_heads, runner.tp.world_size)
        self._num_kv_heads = runner.hf_config.num_key_value_heads
        self._group_store = runner.tp.store
        self._group_prefix = runner.tp.prefix
        runner.step_message = self.step_message

    def step_message(self) -> bytes:
        """The followers' ops for the step about to run (called by rank 0's runner)."""
        from tandem.workers.tp_disagg import encode_ops

        ops, self._follower_ops = self._follower_ops, []
        return encode_ops(ops)

    @property
    def transfer_config(self) -> KVTransferConfig:
        return self._transfer

    def transfer_metrics(self) -> TransferMetrics:
        return self.sender.metrics()

    # event loop ---------------------------------------------------------------------------
    def register(self, request_id: str, destination: KVDestination) -> None:
        with self._lock:
            self._saves[request_id] = _Save(request_id, destination)

    def forget(self, request_id: str) -> None:
        """The caller left: drop a registration the engine has not started on (a started one
        is cleaned up by the engine's `cancel_save`, after it aborted the request)."""
        with self._lock:
            save = self._saves.get(request_id)
            if save is not None and not save.started:
                del self._saves[request_id]

    def pop_result(self, request_id: str) -> str | None:
        """After the request finished: None if its KV was acknowledged, else why not."""
        with self._lock:
            save = self._saves.pop(request_id, None)
        if save is None or not save.done:
            return "the KV export did not run"
        return save.error

    # engine thread ------------------------------------------------------------------------
    @property
    def saves(self) -> bool:
        return True

    def wants_save(self, seq: Sequence) -> bool:
        with self._lock:
            save = self._saves.get(seq.request_id)
            return save is not None and not save.started

    def start_save(self, seq: Sequence) -> None:
        with self._lock:
            save = self._saves[seq.request_id]
            save.started = True
        dest = save.destination
        # Only the blocks the decode worker does not hold; the first token's KV is computed
        # there by its first decode step.
        src_ids = list(seq.block_ids[dest.skip_blocks:])
        try:
            addresses, dst_heads = dest.receivers(self._num_kv_heads)
            if self._rank_heads is None and len(addresses) == 1:
                save.sessions.append(self.sender.begin(seq.request_id, addresses[0], src_ids, dest.dst_block_ids))
            else:
                self._start_parts(seq.request_id, save, src_ids, addresses, dst_heads)
            self._in_step.append(save)
        except (TransferError, ValueError, RuntimeError) as error:
            for session in save.sessions:
                session.abort(str(error))
            save.error = f"send failed: {error}"

    def _start_parts(self, request_id: str, save: _Save, src_ids: list[int], addresses: list[str],
                     dst_heads: list[tuple[int, int]]) -> None:
        """Each rank's heads to the decode ranks holding them (`workers.tp_disagg`)."""
        from tandem.kvtransfer import plan_head_parts
        from tandem.workers.tp_disagg import RankSend, save_op

        src_heads = self._rank_heads or [(0, self._num_kv_heads)]
        sends: dict[int, list[RankSend]] = {}
        for part in plan_head_parts(src_heads, dst_heads):
            sends.setdefault(part.src_rank, []).append(
                RankSend(addresses[part.dst_rank], part.src_heads, part.dst_heads[0]))
        for send in sends.pop(0, []):
            save.sessions.append(self.sender.begin(request_id, send.peer, src_ids, save.destination.dst_block_ids,
                                                   src_heads=send.src_heads, dst_head_start=send.dst_head_start))
        for rank, rank_sends in sorted(sends.items()):
            self._follower_ops.append(save_op(rank, request_id, src_ids, save.destination.dst_block_ids, rank_sends))
            save.followers.append(rank)

    def layer_computed(self, layer: int) -> None:
        if self.stream_layers:
            self._send(layer + 1)

    def step_computed(self) -> None:
        self._send(None)
        # The acknowledgement is bounded from here, when every layer is handed over (the forward
        # itself may take longer than a transfer: a long prompt on a slow device).
        deadline = time.monotonic() + self._deadline_s
        for save in self._in_step:
            save.deadline = deadline
        self._in_step.clear()

    def _send(self, up_to: int | None) -> None:
        """Hand every saving session its layers below `up_to` (None: all) not handed yet."""
        for save in self._in_step:
            for session in save.sessions:
                end = session.num_layers if up_to is None else min(up_to, session.num_layers)
                if save.error is not None or end <= session.layers_queued:
                    continue
                try:
                    session.send_layers(session.layers_queued, end)
                except TransferError as error:  # the session failed (peer gone, aborted)
                    save.error = f"send failed: {error}"

    def save_done(self, seq: Sequence) -> bool:
        with self._lock:
            save = self._saves.get(seq.request_id)
        if save is None:
            return True
        if not all(session.done() for session in save.sessions) or not self._followers_reported(save):
            if time.monotonic() < save.deadline:
                return False
            for session in save.sessions:
                session.abort("no acknowledgement before the deadline")
            if save.followers and save.error is None:
                save.error = f"tensor-parallel ranks {save.followers} did not report their KV sent before the deadline"
            self._orphan_reports.extend((save.request_id, rank) for rank in save.followers)  # late reports
        for session in save.sessions:
            if session.error is not None and save.error is None:
                save.error = str(session.error)
        save.done = True
        if save.error is None:
            self.exports_ok += 1
        else:
            self.exports_failed += 1
        return True

    def cancel_save(self, seq: Sequence) -> None:
        with self._lock:
            save = self._saves.pop(seq.request_id, None)
        if save is None:
            return
        for session in save.sessions:
            session.abort("request aborted on the prefill worker")
        if save.followers:
            from tandem.workers.tp_disagg import abort_op

            self._follower_ops.append(abort_op(seq.request_id))
            self._orphan_reports.extend((seq.request_id, rank) for rank in save.followers)

    def _followers_reported(self, save: _Save) -> bool:
        """Whether every follower rank sending for `save` reported (its error kept in `save`)."""
        from tandem.workers.tp_disagg import save_key

        self._drop_orphan_reports()
        while save.followers:
            key = save_key(self._group_prefix, save.request_id, save.followers[0])
            if not self._group_store.check([key]):
                return False
            error = self._group_store.get(key).decode()
            self._group_store.delete_key(key)
            if error and save.error is None:
                save.error = error
            save.followers.pop(0)
        return True

    def _drop_orphan_reports(self) -> None:
        """Delete the reports of cancelled saves that have come in since (the store keeps none)."""
        from tandem.workers.tp_disagg import save_key

        left = []
        for rid, rank in self._orphan_reports:
            key = save_key(self._group_prefix, rid, rank)
            if self._group_store.check([key]):
                self._group_store.delete_key(key)
            else:
                left.append((rid, rank))
        self._orphan_reports = left

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
