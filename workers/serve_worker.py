"""`LLMWorker`: one engine (`AsyncLLM`) per Ray Serve replica, streaming token deltas.

The ingress tokenizes and calls `generate(WorkerRequest)` through a streaming
`DeploymentHandle`; the pool's `TandemRequestRouter` reads the request's `prompt_token_ids`
and `session_id` to pick the replica. The worker yields small `WorkerDelta`s (new token ids
and text per output, finish reasons, logprobs, counts). When the caller goes away, Serve
cancels this generator, and leaving `AsyncLLM.generate` early aborts the engine request,
which frees its blocks at once.

A background task publishes the engine's prefix-cache events and its load to the pool's
prefix index (`router.publisher.KVEventPublisher`) every `publish_interval_s`, its counters to
the app's stats board (for the ingress's `/metrics`), and the replica's Ray metrics
(`workers.metrics.WorkerMetrics`, vLLM-style names, tagged by pool and replica).
`record_autoscaling_stats` is Serve's custom-autoscaling hook (the keys
`workers.autoscaling.STAT_KEYS`). Engine state is read only through `AsyncLLM.call_in_engine`,
so the engine thread stays its only owner.

In colocated mode this one deployment is the whole engine pool ("the decode pool" to the
ingress); the disaggregated roles will sit beside it with the same `generate` contract.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import NoReturn
from dataclasses import dataclass

from ray import serve

from tandem.engine.async_engine import AsyncLLM, EngineDeadError, EngineTiming
from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import KVConnector
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.outputs import RequestOutput
from tandem.protocol.kv_events import KVEvent
from tandem.protocol.worker import (EngineStats, OutputDelta, TokenLogprob, WorkerDelta, WorkerRequest, WorkerStats,
                                    WorkerTiming)
from tandem.workers.metrics import WorkerMetrics

logger = logging.getLogger("ray.serve")


def worker_timing(received: float, received_unix: float, engine: EngineTiming) -> WorkerTiming:
    """From `generate`'s start (`perf_counter`, wall clock) and the engine thread's stamps; now is
    the first yield."""
    def since(stamp: float | None) -> float | None:
        return None if stamp is None else stamp - received

    return WorkerTiming(received_unix, since(engine.added), since(engine.first_step), since(engine.first_output),
                        time.perf_counter() - received)


@dataclass
class EngineReading:
    """What the publish loop takes from the engine thread in one call."""

    events: list[KVEvent]
    stats: EngineStats
    queued_prefill_tokens: int
    num_waiting_for_kv: int  # sequences whose prompt KV comes from the prefill pool
    expert_load: object = None  # engine.models.moe.ExpertLoadStats, MoE models only, when asked


def queued_prefill_tokens(engine: LLMEngine) -> int:
    """Prompt tokens not yet prefilled: the rest of every waiting sequence (a preempted one is
    recomputed, so its outputs count too) and of every partially prefilled running one. A
    decoding sequence has exactly one uncomputed token, its last sampled one: not prefill work."""
    sch = engine.scheduler
    # (Under overlap scheduling that token may still be a placeholder: count outputs by length.)
    running = sum(max(0, s.num_tokens - s.num_computed_tokens - (1 if s.num_tokens > s.num_prompt_tokens else 0))
                  for s in sch.running)
    return sch.num_waiting_tokens + running


def read_engine(engine: LLMEngine, with_expert_load: bool = False) -> EngineReading:
    expert_load = None
    recorder = getattr(engine.runner.model, "expert_load", None)
    if with_expert_load and recorder is not None:
        expert_load = recorder.snapshot()
    return EngineReading(engine.drain_cache_events(), engine.stats(), queued_prefill_tokens(engine),
                         len(engine.scheduler.waiting_for_kv), expert_load)


def autoscaling_stats(engine: LLMEngine) -> dict[str, float]:
    """The replica's load for Serve's custom autoscaling policies (`workers.autoscaling`).
    `num_waiting` counts sequences waiting for the prefill pool's KV too: they hold blocks
    here and join this replica's batch next."""
    sch = engine.scheduler
    return {
        "queued_prefill_tokens": float(queued_prefill_tokens(engine)),
        "num_running": float(len(sch.running)),
        "num_waiting": float(len(sch.waiting) + len(sch.waiting_for_kv)),
        "kv_usage": float(engine.block_manager.usage),
    }


def _delta_logprobs(output, num_new: int, top_n: int) -> list[TokenLogprob] | None:
    if output.logprobs is None or num_new == 0:
        return None
    result = []
    for token_id, entry in zip(output.token_ids[-num_new:], output.logprobs[-num_new:]):
        # The entry holds the chosen token and the top n; the chosen one may be outside them.
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)[:top_n]
        result.append(TokenLogprob(token_id, entry[token_id].logprob, [(lp.token_id, lp.logprob) for lp in ranked]))
    return result


def to_delta(out: RequestOutput, replica_id: str, top_n: int = 0) -> WorkerDelta:
    outputs = [
        OutputDelta(
            index=o.index,
            token_ids=list(o.delta_token_ids),
            text=o.delta_text,
            logprobs=_delta_logprobs(o, len(o.delta_token_ids), top_n),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in out.outputs
    ]
    return WorkerDelta(
        request_id=out.request_id,
        outputs=outputs,
        finished=out.finished,
        num_prompt_tokens=len(out.prompt_token_ids),
        num_cached_tokens=out.num_cached_tokens,
        num_output_tokens=sum(len(o.token_ids) for o in out.outputs),
        replica_id=replica_id,
    )


class LLMWorker:
    """A Serve deployment class (decorated in `workers.app`): one engine per replica."""

    pool = "colocated"  # the `pool` tag of this replica's metrics

    def __init__(self, model: str, engine_kwargs: dict | None = None, device: str = "cpu",
                 publish_interval_s: float = 0.05, stats_interval_s: float = 0.25,
                 expert_load_interval_s: float = 1.0, kv_connector: KVConnector | None = None) -> None:
        """`kv_connector`: the role's port for KV from or to other workers (the prefill and
        decode roles pass theirs; colocated: none)."""
        config = EngineConfig(model=model, device=device, **(engine_kwargs or {}))
        self._engine = self._start_engine(config, kv_connector)
        self._publish_interval_s = publish_interval_s
        self._stats_interval_s = stats_interval_s
        self._expert_load_interval_s = expert_load_interval_s
        self._replica_id = "local"
        self._publisher = None
        self._board = None
        try:
            context = serve.get_replica_context()
        except Exception:  # constructed outside Serve (tests of the class itself)
            context = None
        if context is not None:
            from tandem.router.openai_metrics import get_stats_board
            from tandem.router.publisher import KVEventPublisher

            self._publisher = KVEventPublisher.for_current_replica()
            self._replica_id = self._publisher.replica_id
            self._board = get_stats_board(context.app_name)
        self.metrics = WorkerMetrics(self.pool, self._replica_id, os.path.basename(os.path.normpath(model)))
        self._publish_task: asyncio.Task | None = None
        self._publish_error: BaseException | None = None

    # ----------------------------------------------------------------- requests
    async def generate(self, request: WorkerRequest) -> AsyncIterator[WorkerDelta]:
        received, received_unix = time.perf_counter(), time.time()
        self._ensure_publishing()
        top_n = request.logprobs or 0
        engine_timing = EngineTiming()
        try:
            params = request.sampling_params()
            # coalesce: when this loop or the Serve hop behind it falls behind the engine, the
            # steps already done leave as one delta (one Serve message, one SSE chunk).
            stream = self._engine.generate({"prompt_token_ids": list(request.prompt_token_ids)}, params,
                                           request.request_id, engine_timing, request.continuation, coalesce=True)
            first = await stream.__anext__()
        except ValueError as error:  # bad input: refused before it touched the engine
            yield WorkerDelta(request.request_id, [], True, len(request.prompt_token_ids),
                              replica_id=self._replica_id, error=str(error))
            return
        except EngineDeadError as error:
            self._end_replica(repr(error))
        # Leaving this generator early (Serve cancels it when the caller goes away) closes
        # `stream`, and AsyncLLM aborts the request and frees its blocks.
        try:
            first_delta = to_delta(first, self._replica_id, top_n)
            first_delta.timing = worker_timing(received, received_unix, engine_timing)
            yield first_delta
            if first.finished:
                return
            async for out in stream:
                yield to_delta(out, self._replica_id, top_n)
        except EngineDeadError as error:
            self._end_replica(repr(error))
        finally:
            await stream.aclose()

    def stats(self) -> WorkerStats:
        return WorkerStats(self._replica_id, self._engine.stats(), time.time())

    def replica_id(self) -> str:
        return self._replica_id

    def metric_samples(self) -> dict[str, float]:
        """The values this replica last exported as Ray metrics (`WorkerMetrics.samples`)."""
        return self.metrics.samples()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-autoscaling hook: `queued_prefill_tokens`, `num_running`,
        `num_waiting`, `kv_usage` (0..1), read on the engine thread at a step boundary."""
        if self._engine.is_dead:
            raise RuntimeError("the engine loop died; see the replica's log")
        return await asyncio.wrap_future(self._engine.call_in_engine(autoscaling_stats))

    async def check_health(self) -> None:
        self._ensure_publishing()
        if self._engine.is_dead:
            self._end_replica("the engine loop died")
        if self._publish_error is not None:
            logger.warning("KV event publishing failed: %r", self._publish_error)

    def _end_replica(self, reason: str) -> NoReturn:
        """This replica's engine can no longer step (its loop died, or a rank of its group is
        gone): end the process. Serve drops a dead replica from routing at once and starts a new
        one, and every stream the replica served fails with Ray's `RayActorError`, which the
        ingress continues on a live replica (`router/continuation.py`). Left alive, the replica
        would refuse requests until its health check failed and then drain its hopeless streams
        for up to the pool's graceful-shutdown timeout."""
        logger.error("replica %s ends its process: %s", self._replica_id, reason)
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        os._exit(1)

    def _start_engine(self, config: EngineConfig, kv_connector: KVConnector | None) -> AsyncLLM:
        """This replica's engine. An expert-parallel replica (`workers.ep_replica`) starts its
        group here and returns it seen as one engine (`ExpertParallelEngine`)."""
        return AsyncLLM.from_config(config, kv_connector)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    # -------------------------------------------------------------- publishing
    def _ensure_publishing(self) -> None:
        if self._publish_task is None or self._publish_task.done():
            self._publish_task = asyncio.get_running_loop().create_task(self._publish_loop())

    def _update_role_metrics(self, reading: EngineReading) -> None:
        """The prefill and decode roles add their transfer counters."""

    async def _publish_loop(self) -> None:
        from tandem.protocol.load import ReplicaLoad

        last_stats: EngineStats | None = None
        last_load_at = last_board_at = last_experts_at = 0.0
        while True:
            try:
                now = time.time()
                with_experts = now - last_experts_at >= self._expert_load_interval_s
                reading = await asyncio.wrap_future(self._engine.call_in_engine(read_engine, with_experts))
                stats = reading.stats
                self.metrics.update_engine(stats, reading.queued_prefill_tokens)
                if reading.expert_load is not None:
                    self.metrics.update_expert_load(reading.expert_load)
                if with_experts:
                    last_experts_at = now
                self._update_role_metrics(reading)
                if self._publisher is not None:
                    if reading.events:
                        self._publisher.publish(reading.events)
                    changed = stats != last_stats
                    if changed or now - last_load_at > 1.0:
                        self._publisher.report_load(ReplicaLoad(
                            self._replica_id, stats.num_running, stats.num_waiting, stats.num_running_tokens,
                            stats.num_waiting_tokens, stats.num_free_blocks, stats.num_total_blocks, now))
                        last_load_at = now
                    if (changed and now - last_board_at >= self._stats_interval_s) or now - last_board_at > 1.0:
                        self._board.report.remote(self._replica_id, dataclasses.asdict(stats), now)
                        last_board_at = now
                last_stats = stats
            except Exception as error:  # a view: losing events costs hit rate, not correctness
                self._publish_error = error
                logger.warning("publishing KV events and metrics failed: %r", error)
            await asyncio.sleep(self._publish_interval_s)
