"""`PrefillWorker`: one prefill engine per Ray Serve replica of the prefill pool.

It is an `LLMWorker` (same engine loop, KV-event publishing to its own pool's prefix index,
same `generate` for direct use) whose engine saves KV through a `PrefillConnector`
(`workers.disagg`): `prefill(PrefillRequest)` runs the prompt through the shared continuous
batch (chunked, batched with other prefills, reusing this worker's prefix cache), streams the
blocks the decode worker lacks into its block ids through `kvtransfer` layer by layer while the
forward pass runs, and returns the first token once the receiver acknowledged them. Its blocks are
then freed and stay in the prefix cache, so a shared system prompt is prefilled once.

The decode side calls it as `prefill_stream`: the same, with a `PrefillAlive` every
`keepalive_s` until the result, so that a replica that hangs (frozen, its event loop stuck)
before it sent any KV is told from a busy one within seconds.

If the caller goes away (Serve cancels the call), the engine request is aborted and its
blocks are freed at once; an export in flight is aborted too.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from tandem.protocol.prefill import PrefillAlive, PrefillRequest, PrefillResult
from tandem.workers.disagg import KVDestination, PrefillConnector, transfer_config
from tandem.protocol.worker import WorkerStats
from tandem.workers.serve_worker import EngineReading, LLMWorker


@dataclasses.dataclass
class PrefillWorkerStats(WorkerStats):
    role: str = "prefill"
    transfer: object = None  # kvtransfer.TransferMetrics of the sender
    exports_ok: int = 0
    exports_failed: int = 0


class PrefillWorker(LLMWorker):
    """A Serve deployment class: decorate with `serve.deployment` and pin it to the prefill
    pool's nodes (`ray_actor_options={"resources": {"prefill": 1}}`)."""

    pool = "prefill"  # the `pool` tag of this replica's metrics

    def __init__(self, model: str, engine_kwargs: dict | None = None, device: str = "cpu",
                 transfer_kwargs: dict | None = None, stream_layers: bool = True, **worker_kwargs) -> None:
        """`stream_layers`: send each layer's KV as the forward computes it (default), or all
        layers after the forward (the baseline the layer-streaming benchmark compares with)."""
        self._exporter = PrefillConnector(transfer_config(transfer_kwargs), stream_layers)
        super().__init__(model, engine_kwargs, device, kv_connector=self._exporter, **worker_kwargs)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        self._ensure_publishing()
        rid = request.transfer_id
        self._exporter.register(rid, KVDestination(request.receiver_address, list(request.dst_block_ids),
                                                   request.skip_blocks, request.receiver_addresses,
                                                   request.dst_kv_heads))
        last = None
        finished = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": list(request.prompt_token_ids)},
                                                   request.sampling_params, rid):
                last = out
            finished = True
        except ValueError as error:  # refused before it touched the engine
            return PrefillResult(rid, error=str(error))
        finally:
            if not finished:
                self._exporter.forget(rid)
        error = self._exporter.pop_result(rid)
        output = last.outputs[0] if last is not None and last.outputs else None
        if output is None or not output.token_ids or output.finish_reason == "abort":
            return PrefillResult(rid, error=error or "the prefill was aborted")
        if error is not None:
            return PrefillResult(rid, error=error)
        logprobs = output.logprobs[0] if output.logprobs else None
        return PrefillResult(rid, output.token_ids[0], logprobs, last.num_cached_tokens)

    async def prefill_stream(self, request: PrefillRequest) -> AsyncIterator[PrefillAlive | PrefillResult]:
        """`prefill` as the decode side calls it through Serve: a `PrefillAlive` every
        `request.keepalive_s` while it works, then its result. Closing the stream (the caller gave
        up) cancels the prefill, which aborts the request and forgets its export."""
        task = asyncio.ensure_future(self.prefill(request))
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=request.keepalive_s)
                if not done:
                    yield PrefillAlive(request.transfer_id)
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _update_role_metrics(self, reading: EngineReading) -> None:
        self.metrics.update_transfer(self._exporter.transfer_metrics(), "sent")

    def stats(self) -> PrefillWorkerStats:
        base = super().stats()
        return PrefillWorkerStats(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                                  transfer=self._exporter.transfer_metrics(),
                                  exports_ok=self._exporter.exports_ok,
                                  exports_failed=self._exporter.exports_failed)
