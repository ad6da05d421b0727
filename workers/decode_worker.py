"""`DecodeWorker`: one decode engine per Ray Serve replica of the decode pool, and the
orchestrator of a disaggregated request.

Same contract as `LLMWorker` (`generate(WorkerRequest)` streams `WorkerDelta`s), so the ingress
targets the decode pool unchanged. Inside, the engine's scheduler matches this worker's prefix
cache and allocates blocks for the whole prompt; an uncached suffix of at least
`remote_prefill_min_tokens` is prefilled by the prefill pool: the engine's `DecodeConnector`
(`workers.disagg`) calls `PrefillWorker.prefill` through a `DeploymentHandle`, and the KV lands
in those blocks over `kvtransfer` while this worker's batch keeps decoding; a shorter one is
prefilled here. A prefill worker that fails, times out or sends bad KV costs latency only: the
rest of the prompt is recomputed here.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from tandem.protocol.worker import WorkerDelta, WorkerRequest, WorkerStats
from tandem.workers.disagg import DecodeConnector, DisaggConfig, DisaggCounters, transfer_config
from tandem.workers.serve_worker import EngineReading, LLMWorker


@dataclasses.dataclass
class DecodeWorkerStats(WorkerStats):
    role: str = "decode"
    num_waiting_for_kv: int = 0  # sequences waiting for their KV, off the batch (last reading)
    transfer: object = None  # kvtransfer.TransferMetrics of the receiver
    disagg: DisaggCounters = dataclasses.field(default_factory=DisaggCounters)


class DecodeWorker(LLMWorker):
    """A Serve deployment class: decorate with `serve.deployment`, pin it to the decode pool's
    nodes (`ray_actor_options={"resources": {"decode": 1}}`), bind it with the bound
    `PrefillWorker` deployment as `prefill`."""

    pool = "decode"

    def __init__(self, model: str, prefill, engine_kwargs: dict | None = None, device: str = "cpu",
                 disagg_kwargs: dict | None = None, transfer_kwargs: dict | None = None,
                 **worker_kwargs) -> None:
        self._connector = DecodeConnector(transfer_config(transfer_kwargs), DisaggConfig(**(disagg_kwargs or {})),
                                          prefill)
        self._num_waiting_for_kv = 0
        super().__init__(model, engine_kwargs, device, kv_connector=self._connector, **worker_kwargs)

    async def generate(self, request: WorkerRequest) -> AsyncIterator[WorkerDelta]:
        self._connector.bind_loop(asyncio.get_running_loop())
        stream = super().generate(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # a cancelled caller aborts the request, on both sides

    def _update_role_metrics(self, reading: EngineReading) -> None:
        self._num_waiting_for_kv = reading.num_waiting_for_kv
        self.metrics.update_transfer(self._connector.transfer_metrics(), "received")
        self.metrics.update_disagg(self._connector.counters(), reading.num_waiting_for_kv)

    def stats(self) -> DecodeWorkerStats:
        base = super().stats()
        return DecodeWorkerStats(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                                 num_waiting_for_kv=self._num_waiting_for_kv,
                                 transfer=self._connector.transfer_metrics(), disagg=self._connector.counters())
