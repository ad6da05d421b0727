"""Expert parallelism in a Serve pool: one replica is one expert-parallel group of N ranks.

As in vLLM's data-parallel + expert-parallel deployment, attention is data parallel and the
experts are split: every rank runs its own engine (`AsyncLLM` over an
`ExpertParallelModelRunner`) with its own scheduler, KV cache and batch, and the engines meet
only in the MoE layers' all-to-alls (`engine.expert_parallel`).

- The Serve replica is rank 0. At start it hosts the group's TCPStore on its node's IP (a free
  port, a prefix unique to the replica) and creates ranks 1..N-1 as plain Ray actors
  (`ExpertParallelRank`), one per GPU, each in its own bundle of the replica's placement group
  (`workers.app` asks Serve for N identical bundles, STRICT_PACK, so the N GPUs are reserved
  together on one node). A rank actor holds a worker object of the replica's own role
  (`LLMWorker`, `PrefillWorker` or `DecodeWorker`), so KV export, remote prefill and stage
  timing work on every rank exactly as on a plain replica.
- The replica spreads its requests over the ranks (`choose_rank`): the rank holding the longest
  cached prefix of the prompt, unless it has `RANK_IMBALANCE_LIMIT` more requests in flight
  than the least busy rank; otherwise the least busy rank (ties rotate). `generate` streams the
  chosen rank's deltas back (a Ray streaming generator), `prefill` returns its result; a caller
  that leaves cancels the rank's call and aborts the request there.
- To the router the group is one replica: `ExpertParallelEngine.call_in_engine` answers the
  publish loop's `read_engine` and Serve's `autoscaling_stats` for the whole group, merging the
  ranks' prefix-cache events under the replica's id (a block is "stored" when a first rank
  stores it and "removed" when no rank holds it any more; `RankCaches`), and summing loads,
  engine counters and expert load. The same per-rank caches pick the rank for a request.
- Rank actors die with the replica: the replica kills them on shutdown, Ray kills them with
  their owner or their placement group. A group that loses a rank cannot step, so the replica
  ends its own process as soon as it sees the loss (a rank's stream or call fails, or a health
  check): Serve replaces the whole group, and the ingress continues the group's streams on a
  live replica (`LLMWorker._end_replica`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray

from tandem.engine.async_engine import AsyncLLM
from tandem.protocol.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEvent, Tier
from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import KVConnector
from tandem.workers.decode_worker import DecodeWorker
from tandem.protocol.prefill import PrefillRequest, PrefillResult
from tandem.engine.llm_engine import LLMEngine
from tandem.protocol.worker import EngineStats
from tandem.workers.metrics import WorkerMetrics
from tandem.workers.prefill_worker import PrefillWorker
from tandem.protocol.prefix_hash import hash_full_blocks
from tandem.protocol.worker import WorkerDelta, WorkerRequest
from tandem.workers.rank_group import RANK_NAMESPACE  # noqa: F401 (re-exported: the rank actors' namespace)
from tandem.workers.rank_group import (RankActorsHealth, RankLostError, RankSpec, kill_rank_actors,
                                       rank_actor_name, start_rank_actors, store_barrier)
from tandem.workers.serve_worker import EngineReading, LLMWorker, autoscaling_stats, read_engine

logger = logging.getLogger("ray.serve")

RANK_IMBALANCE_LIMIT = 4  # requests in flight a prefix hit may cost over the least busy rank


# --------------------------------------------------------------------------------- the degree
def check_expert_parallel_size(model: str, size: int) -> None:
    """A clear ValueError for a degree this model cannot run with."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"expert_parallel_size must be an integer >= 1, got {size!r}")
    if size == 1:
        return
    from tandem.engine.model_runner import load_hf_config
    from tandem.engine.models import model_class_for
    from tandem.engine.models.moe import MoeForCausalLM, num_experts_of

    hf_config = load_hf_config(model)
    if model_class_for(hf_config) is not MoeForCausalLM:
        raise ValueError(f"expert_parallel_size={size} needs a mixture-of-experts model; {model!r} is a dense "
                         f"{'/'.join(hf_config.architectures or ['?'])}")
    num_experts = num_experts_of(hf_config)
    if size > num_experts:
        raise ValueError(f"expert_parallel_size={size} is larger than the model's {num_experts} experts: every rank "
                         f"must hold at least one")


# ------------------------------------------------------------------------ per-rank prefix caches
class RankCaches:
    """Which full blocks (by hash) each rank's prefix cache holds, per tier, fed by the ranks'
    cache events; turns them into the replica's events (what the pool's prefix index sees)."""

    def __init__(self, world_size: int) -> None:
        self.held: list[set[int]] = [set() for _ in range(world_size)]  # device tier
        self.host_held: list[set[int]] = [set() for _ in range(world_size)]  # host tier
        self._holders: dict[tuple[Tier, int], int] = {}  # (tier, block hash) -> ranks holding it

    def apply(self, rank: int, events: Sequence[KVEvent]) -> list[KVEvent]:
        """Record `rank`'s events; returns the replica-level events they amount to."""
        merged: list[KVEvent] = []
        for event in events:
            match event:
                case BlocksStored(block_hashes, _, tier):
                    held = self._held(rank, tier)
                    for block_hash in block_hashes:
                        if block_hash not in held:
                            held.add(block_hash)
                            self._holders[tier, block_hash] = self._holders.get((tier, block_hash), 0) + 1
                    # Forwarded whole: the index keeps the chain, and a block it has is a no-op.
                    merged.append(event)
                case BlocksRemoved(block_hashes, tier):
                    held = self._held(rank, tier)
                    merged += self._drop(held, tier, [h for h in block_hashes if h in held])
                case AllBlocksCleared():
                    merged += self._drop(self.held[rank], Tier.GPU, list(self.held[rank]))
                    merged += self._drop(self.host_held[rank], Tier.HOST, list(self.host_held[rank]))
                case _:
                    raise TypeError(f"not a KV event: {type(event).__name__}")
        return merged

    def _held(self, rank: int, tier: Tier) -> set[int]:
        return self.host_held[rank] if tier is Tier.HOST else self.held[rank]

    def _drop(self, held: set[int], tier: Tier, dropped: list[int]) -> list[KVEvent]:
        """One rank no longer holds `dropped` in `tier`: the replica loses those no other rank holds."""
        gone = []
        for block_hash in dropped:
            held.discard(block_hash)
            left = self._holders.pop((tier, block_hash)) - 1
            if left:
                self._holders[tier, block_hash] = left
            else:
                gone.append(block_hash)
        return [BlocksRemoved(gone, tier)] if gone else []

    def cached_blocks(self, block_hashes: Sequence[int]) -> list[int]:
        """Per rank: how many leading blocks of the chain it holds."""
        counts = []
        for held in self.held:
            n = 0
            while n < len(block_hashes) and block_hashes[n] in held:
                n += 1
            counts.append(n)
        return counts


def choose_rank(cached_blocks: Sequence[int], outstanding: Sequence[int], first: int = 0,
                imbalance_limit: int = RANK_IMBALANCE_LIMIT) -> int:
    """The rank with the longest cached prefix, unless it has more than `imbalance_limit`
    requests in flight over the least busy rank; else the least busy rank (ties: the first
    from `first` on, so a caller rotating `first` spreads an idle group's requests)."""
    n = len(outstanding)
    order = [(first + i) % n for i in range(n)]
    least = min(order, key=lambda r: outstanding[r])
    best = max(order, key=lambda r: (cached_blocks[r], -outstanding[r]))
    if cached_blocks[best] > 0 and outstanding[best] - outstanding[least] <= imbalance_limit:
        return best
    return least


# ------------------------------------------------------------------------------- merging ranks
def merge_stats(parts: Sequence[Any]) -> Any:
    """The group's stats from its ranks' (same dataclass each): counts summed, `timestamp` the
    latest, text the first non-empty, `kv_usage` (and the host tier's) recomputed from the summed blocks."""
    first = parts[0]
    values = {}
    for f in dataclasses.fields(first):
        if not f.init:
            continue
        column = [getattr(p, f.name) for p in parts]
        head = column[0]
        if f.name == "timestamp":
            values[f.name] = max(column)
        elif dataclasses.is_dataclass(head) and not isinstance(head, type):
            values[f.name] = merge_stats(column)
        elif isinstance(head, bool):
            values[f.name] = any(column)
        elif isinstance(head, (int, float)):
            values[f.name] = sum(column)
        elif isinstance(head, str):
            values[f.name] = next((v for v in column if v), head)
        else:
            values[f.name] = head
    if isinstance(first, EngineStats):
        total = values["num_total_blocks"]
        values["kv_usage"] = 1.0 - values["num_free_blocks"] / total if total else 0.0
        host_total = values["host_kv_total_blocks"]
        values["host_kv_usage"] = values["host_kv_used_blocks"] / host_total if host_total else 0.0
    return dataclasses.replace(first, **values)


def _merge_expert_load(loads: list):
    if any(load is None for load in loads):
        return None
    first = loads[0]

    def add(rows: list[list[list[int]]]) -> list[list[int]]:
        return [[sum(col) for col in zip(*layer)] for layer in zip(*rows)]

    return dataclasses.replace(first, last_step=add([x.last_step for x in loads]),
                               cumulative=add([x.cumulative for x in loads]),
                               num_steps=max(x.num_steps for x in loads))


def _merge_readings(group: ExpertParallelEngine, readings: list[EngineReading]) -> EngineReading:
    group.local_reading = readings[0]
    events: list[KVEvent] = []
    for rank, reading in enumerate(readings):
        events += group.caches.apply(rank, reading.events)
    return EngineReading(events, merge_stats([r.stats for r in readings]),
                         sum(r.queued_prefill_tokens for r in readings),
                         sum(r.num_waiting_for_kv for r in readings),
                         _merge_expert_load([r.expert_load for r in readings]))


def _merge_autoscaling(group: ExpertParallelEngine, parts: list[dict[str, float]]) -> dict[str, float]:
    # Every rank has the same cache size, so the group's KV use is the ranks' mean.
    merged = {key: sum(p[key] for p in parts) for key in parts[0]}
    merged["kv_usage"] = merged["kv_usage"] / len(parts)
    return merged


# What `call_in_engine` answers for the whole group (every rank's engine thread, merged).
GROUP_READINGS = {read_engine: _merge_readings, autoscaling_stats: _merge_autoscaling}


# -------------------------------------------------------------------------- starting the group
def _ep_engine(config: EngineConfig, ep, kv_connector: KVConnector | None) -> LLMEngine:
    """An `LLMEngine` whose runner holds this rank's experts."""
    from tandem.engine.ep_runner import ExpertParallelModelRunner

    return LLMEngine(config, runner_factory=functools.partial(ExpertParallelModelRunner, ep=ep),
                     kv_connector=kv_connector)


def start_rank_engine(config: EngineConfig, spec: RankSpec, kv_connector: KVConnector | None, store=None,
                      check=None) -> AsyncLLM:
    """This rank's engine of the group: joins the store, builds the group and the engine, and
    starts stepping only once every rank has loaded (an idle rank steps collectively at once)."""
    from tandem.engine.expert_parallel import ExpertParallelGroup

    if store is None:
        store = spec.connect_store()
    store_barrier(store, spec, "joined", check)
    ep = ExpertParallelGroup(store, spec.rank, spec.world_size, config.device, prefix=spec.prefix,
                             timeout_s=spec.group_timeout_s)
    # The dispatch syncs the host for its split sizes, so no CUDA graphs (docs/MOE.md).
    engine = _ep_engine(dataclasses.replace(config, enforce_eager=True), ep, kv_connector)
    engine.ep_store = store  # the store (rank 0: its server) lives as long as the engine
    store_barrier(store, spec, "loaded", check)
    return AsyncLLM(engine)


def start_group(role: str, worker_args: tuple, worker_kwargs: dict, config: EngineConfig, world_size: int,
                rank_actor_options: dict[str, Any], kv_connector: KVConnector | None) -> ExpertParallelEngine:
    """Rank 0 (this process) plus ranks 1..N-1 as actors: the group seen as one engine."""
    check_expert_parallel_size(config.model, world_size)
    group = start_rank_actors("expert-parallel", "ep", world_size, _RankActor, rank_actor_options,
                              lambda spec: (role, worker_args, worker_kwargs, spec))
    try:
        local = start_rank_engine(config, group.specs[0], kv_connector, group.store, group.check_started)
        group.wait_started()
    except BaseException:
        group.kill()
        raise
    replica_id = group.specs[0].replica_id
    logger.info("expert-parallel group of %d ranks up for %s", world_size, replica_id)
    return ExpertParallelEngine(local, group.actors, config.block_size, replica_id)


# --------------------------------------------------------------------------- the group, as one
class ExpertParallelEngine(RankActorsHealth):
    """What an expert-parallel replica holds in place of its `AsyncLLM`: rank 0's engine (in
    this process) and the actors of ranks 1..N-1.

    It answers the `AsyncLLM` calls `LLMWorker` makes. `generate`, `abort`, `stats` and
    `engine` are rank 0's (the replica's `generate` has chosen the rank already). A
    `call_in_engine` of a function in `GROUP_READINGS` runs on every rank's engine thread and
    returns the merged answer (call it from the replica's event loop); any other function runs
    on rank 0's engine only."""

    group_kind = "expert-parallel"

    def __init__(self, local: AsyncLLM, ranks: list, block_size: int, replica_id: str) -> None:
        self.local = local
        self.replica_id = replica_id
        self.ranks = ranks  # actor handles of ranks 1..N-1
        self.world_size = len(ranks) + 1
        self.block_size = block_size
        self.caches = RankCaches(self.world_size)
        self.outstanding = [0] * self.world_size  # requests in flight per rank
        self.num_served = [0] * self.world_size
        self._next_first = itertools.count()
        self.local_reading: EngineReading | None = None  # rank 0's part of the last group reading

    # AsyncLLM's face (rank 0) -------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        return self.local.engine

    @property
    def tokenizer(self):
        return self.local.tokenizer

    @property
    def is_dead(self) -> bool:
        return self.local.is_dead or self.rank_error is not None

    def generate(self, *args, **kwargs):
        return self.local.generate(*args, **kwargs)

    def abort(self, request_id: str) -> None:
        self.local.abort(request_id)

    def stats(self) -> EngineStats:
        return self.local.stats()

    def call_in_engine(self, fn, *args):
        merge = GROUP_READINGS.get(fn)
        if merge is None:
            return self.local.call_in_engine(fn, *args)
        return asyncio.run_coroutine_threadsafe(self._call_group(fn, merge, args), asyncio.get_running_loop())

    async def _call_group(self, fn, merge, args):
        mine = asyncio.wrap_future(self.local.call_in_engine(fn, *args))
        results = await asyncio.gather(mine, *(self._remote(r, actor.call_in_engine.remote(fn, *args))
                                               for r, actor in enumerate(self.ranks, start=1)))
        return merge(self, list(results))

    def shutdown(self) -> None:
        kill_rank_actors(self.ranks)
        self.local.shutdown()

    # spreading requests ---------------------------------------------------------------------
    def choose_rank(self, prompt_token_ids: Sequence[int]) -> int:
        cached = self.caches.cached_blocks(hash_full_blocks(prompt_token_ids, self.block_size))
        return choose_rank(cached, self.outstanding, next(self._next_first) % self.world_size)

    def begin(self, rank: int) -> None:
        self.outstanding[rank] += 1
        self.num_served[rank] += 1

    def end(self, rank: int) -> None:
        self.outstanding[rank] -= 1

    async def stream(self, rank: int, request: WorkerRequest) -> AsyncIterator[WorkerDelta]:
        """Rank `rank`'s `generate(request)`; leaving early cancels it and aborts the request."""
        actor = self.ranks[rank - 1]
        deltas = actor.generate.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in deltas:
                delta = await self._remote(rank, ref)
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                try:
                    ray.cancel(deltas)
                    actor.abort.remote(request.request_id)
                except Exception as error:  # the rank is gone: nothing left to stop
                    logger.debug("cancelling on expert-parallel rank %d: %r", rank, error)

    async def prefill(self, rank: int, request: PrefillRequest) -> PrefillResult:
        ref = self.ranks[rank - 1].prefill.remote(request)
        try:
            return await self._remote(rank, ref)
        except asyncio.CancelledError:
            ray.cancel(ref)  # the rank's prefill aborts its request and forgets the export
            raise

    async def rank_stats(self) -> list:
        return list(await asyncio.gather(*(self._remote(r, a.stats.remote())
                                           for r, a in enumerate(self.ranks, start=1))))


# ----------------------------------------------------------------------------- the replica side
class ExpertParallelReplica:
    """Mixed into a worker class (`ExpertParallelLLMWorker`, ...): the replica is rank 0 of a
    group of `expert_parallel_size` and spreads its requests over the ranks."""

    role = ""  # key into RANK_WORKERS

    def __init__(self, *args, expert_parallel_size: int, rank_actor_options: dict[str, Any] | None = None,
                 **kwargs) -> None:
        self._ep_size = expert_parallel_size
        self._ep_worker_args = (args, kwargs)
        self._ep_rank_actor_options = dict(rank_actor_options or {})
        super().__init__(*args, **kwargs)

    def _start_engine(self, config: EngineConfig, kv_connector: KVConnector | None) -> ExpertParallelEngine:
        args, kwargs = self._ep_worker_args
        return start_group(self.role, args, kwargs, config, self._ep_size, self._ep_rank_actor_options, kv_connector)

    async def generate(self, request: WorkerRequest) -> AsyncIterator[WorkerDelta]:
        group: ExpertParallelEngine = self._engine
        rank = group.choose_rank(request.prompt_token_ids)
        group.begin(rank)
        stream = super().generate(request) if rank == 0 else group.stream(rank, request)
        try:
            async for delta in stream:
                delta.replica_id = self._replica_id
                yield delta
        except RankLostError as error:
            self._end_replica(str(error))
        finally:
            group.end(rank)
            await stream.aclose()

    async def stats(self):
        """The group's counters (summed over ranks); `rank_stats()` has each rank's."""
        return merge_stats([super().stats(), *await self._engine.rank_stats()])

    async def rank_stats(self) -> list:
        """Each rank's own stats, rank 0 first."""
        return [super().stats(), *await self._engine.rank_stats()]

    def requests_per_rank(self) -> list[int]:
        """Requests each rank was given since start."""
        return list(self._engine.num_served)

    def rank_actor_names(self) -> list[str]:
        """The Ray actor names (namespace `RANK_NAMESPACE`) of ranks 1..N-1."""
        return [rank_actor_name("ep", self._engine.replica_id, r) for r in range(1, self._ep_size)]

    def _update_role_metrics(self, reading: EngineReading) -> None:
        # Role series (KV transfer, remote prefills) are per rank: rank 0's here under the
        # replica's id, rank r's by its actor under "<replica>/rank<r>"; the engine series
        # (`update_engine`) are the group's, here only.
        super()._update_role_metrics(self._engine.local_reading or reading)

    async def check_health(self) -> None:
        try:
            await self._engine.check_ranks()  # first: a dead rank also kills rank 0's engine loop
        except RankLostError as error:
            self._end_replica(str(error))
        await super().check_health()


class ExpertParallelLLMWorker(ExpertParallelReplica, LLMWorker):
    role = "colocated"


class ExpertParallelDecodeWorker(ExpertParallelReplica, DecodeWorker):
    role = "decode"


class ExpertParallelPrefillWorker(ExpertParallelReplica, PrefillWorker):
    role = "prefill"

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        group: ExpertParallelEngine = self._engine
        rank = group.choose_rank(request.prompt_token_ids)
        group.begin(rank)
        try:
            if rank == 0:
                return await super().prefill(request)
            self._ensure_publishing()
            return await group.prefill(rank, request)
        finally:
            group.end(rank)


EXPERT_PARALLEL_WORKERS = {LLMWorker: ExpertParallelLLMWorker, DecodeWorker: ExpertParallelDecodeWorker,
                           PrefillWorker: ExpertParallelPrefillWorker}


# -------------------------------------------------------------------------------- the rank side
class _RankWorker:
    """Mixed into a worker class inside a rank actor: the worker of rank r, whose engine joins
    the replica's group. It publishes nothing itself: the replica reads it with the group."""

    def __init__(self, spec: RankSpec, *args, **kwargs) -> None:
        self._rank_spec = spec
        super().__init__(*args, **kwargs)
        self._replica_id = spec.replica_id
        # Its own series (KV transfer) under its own name; the engine's are the replica's sum.
        self.metrics = WorkerMetrics(self.pool, f"{spec.replica_id}/rank{spec.rank}",
                                     self.metrics.tags["model_name"])

    def _start_engine(self, config: EngineConfig, kv_connector: KVConnector | None) -> AsyncLLM:
        return start_rank_engine(config, self._rank_spec, kv_connector)

    def _ensure_publishing(self) -> None:
        pass


class _RankLLMWorker(_RankWorker, LLMWorker):
    pass


class _RankDecodeWorker(_RankWorker, DecodeWorker):
    pass


class _RankPrefillWorker(_RankWorker, PrefillWorker):
    pass


RANK_WORKERS = {"colocated": _RankLLMWorker, "decode": _RankDecodeWorker, "prefill": _RankPrefillWorker}


class ExpertParallelRank:
    """A plain Ray actor (one per GPU): rank r's worker, created by and dying with its replica."""

    def __init__(self, role: str, worker_args: tuple, worker_kwargs: dict, spec: RankSpec) -> None:
        self.worker = RANK_WORKERS[role](spec, *worker_args, **worker_kwargs)

    def ready(self) -> int:
        return self.worker._rank_spec.rank

    async def generate(self, request: WorkerRequest) -> AsyncIterator[WorkerDelta]:
        stream = self.worker.generate(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # cancelled: the engine request is aborted

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await self.worker.prefill(request)

    def abort(self, request_id: str) -> None:
        self.worker._engine.abort(request_id)

    async def call_in_engine(self, fn, *args):
        result = await asyncio.wrap_future(self.worker._engine.call_in_engine(fn, *args))
        if isinstance(result, EngineReading):
            self.worker._update_role_metrics(result)  # this rank's KV-transfer series
        return result

    def stats(self):
        return self.worker.stats()

    async def check_health(self) -> None:
        await self.worker.check_health()


_RankActor = ray.remote(ExpertParallelRank)
