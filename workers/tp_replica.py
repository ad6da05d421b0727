"""Tensor parallelism in a Serve pool: one replica is one tensor-parallel group of N ranks.

The Serve replica is rank 0: it runs the group's one engine (`AsyncLLM` over a
`TensorParallelModelRunner` leader: one scheduler, one block table, sampling once) and ranks
1..N-1 are plain Ray actors (`TensorParallelRank`), one per bundle of the replica's placement
group, that only follow rank 0's steps (`engine.tp_runner`). The group management (store,
rank actors, barriers, health, death) is `workers.rank_group`'s, shared with expert parallelism.

To the router and the prefix index the group is one replica with one cache: rank 0's events,
stats and load are the group's. Prefill and decode replicas may be tensor parallel, of any two
degrees the KV heads allow: each prefill rank sends the KV heads it holds to the decode ranks
holding them (`workers.tp_disagg`; the follower ranks get their hook, `prefill_follower` or
`decode_follower`, at start, and a decode rank's receiver is driven by rank 0's connector
through the rank actor's `kv_*` methods).
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import ray

from tandem.engine.async_engine import AsyncLLM
from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import KVConnector
from tandem.engine.llm_engine import LLMEngine
from tandem.workers.rank_group import (RankActorsHealth, RankLostError, RankSpec, StartingGroup,
                                       kill_rank_actors, rank_actor_name, start_rank_actors, store_barrier)
from tandem.workers.decode_worker import DecodeWorker
from tandem.workers.prefill_worker import PrefillWorker
from tandem.workers.serve_worker import LLMWorker

logger = logging.getLogger("ray.serve")


def check_tensor_parallel_size(model: str, size: int) -> None:
    """A clear ValueError for a degree this model cannot be split over."""
    from tandem.engine.model_runner import load_hf_config
    from tandem.engine.tensor_parallel import check_tensor_parallel

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
    check_tensor_parallel(load_hf_config(model), size)


def _join_group(config: EngineConfig, spec: RankSpec, store, check=None):
    """This rank's group and its runner's factory, once every rank has joined the store. Every
    rank has loaded its weights before the first collective (the barrier in `_loaded`)."""
    from tandem.engine.tensor_parallel import TensorParallelGroup
    from tandem.engine.tp_runner import TensorParallelModelRunner

    store_barrier(store, spec, "joined", check)
    tp = TensorParallelGroup(store, spec.rank, spec.world_size, config.device, spec.prefix, spec.group_timeout_s)
    loaded = functools.partial(store_barrier, store, spec, "loaded", check)
    return functools.partial(TensorParallelModelRunner, tp=tp, loaded=loaded)


class TensorParallelEngine(RankActorsHealth, AsyncLLM):
    """Rank 0's `AsyncLLM`, plus the actors of ranks 1..N-1: they stop with it, and it is dead
    when one of them is."""

    group_kind = "tensor-parallel"

    def __init__(self, engine: LLMEngine, group: StartingGroup) -> None:
        super().__init__(engine)
        self.group = group
        self.ranks = group.actors

    @property
    def world_size(self) -> int:
        return len(self.ranks) + 1

    @property
    def is_dead(self) -> bool:
        return AsyncLLM.is_dead.fget(self) or self.rank_error is not None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        super().shutdown(timeout_s)  # the engine thread is gone: the channel is ours now
        try:
            self.engine.runner.channel.stop()
        except Exception as error:  # a broken group: the actors are killed anyway
            logger.debug("stopping the tensor-parallel ranks: %r", error)
        kill_rank_actors(self.ranks)


def start_group(config: EngineConfig, world_size: int, rank_actor_options: dict[str, Any],
                kv_connector: KVConnector | None = None, follower_hook=None) -> TensorParallelEngine:
    """Rank 0 (this process) plus ranks 1..N-1 as actors: the group seen as one engine.
    `follower_hook(runner)`: each follower's `FollowerHook`, for a group whose engine moves KV."""
    check_tensor_parallel_size(config.model, world_size)
    group = start_rank_actors("tensor-parallel", "tp", world_size, _RankActor, rank_actor_options,
                              lambda spec: (config, spec, follower_hook))
    try:
        factory = _join_group(config, group.specs[0], group.store, group.check_started)
        engine = LLMEngine(config, runner_factory=factory, kv_connector=kv_connector)
        group.wait_started()
    except BaseException:
        group.kill()
        raise
    logger.info("tensor-parallel group of %d ranks up for %s", world_size, group.specs[0].replica_id)
    return TensorParallelEngine(engine, group)


class TensorParallelRank:
    """A plain Ray actor (one per device): rank r's runner, following rank 0's steps on a thread."""

    def __init__(self, config: EngineConfig, spec: RankSpec, follower_hook=None) -> None:
        from tandem.engine.model_runner import load_hf_config

        self.spec = spec
        self.store = spec.connect_store()
        factory = _join_group(config, spec, self.store)
        self.runner = factory(config, load_hf_config(config.model))
        if follower_hook is not None:
            self.runner.hook = follower_hook(self.runner)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._follow, name=f"tp-rank{spec.rank}", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            self.runner.follow()
        except BaseException as error:
            self.error = error
            logger.error("tensor-parallel rank %d stopped following: %r", self.spec.rank, error)

    def ready(self) -> int:
        return self.spec.rank

    # A decode group's follower (`workers.tp_disagg.DecodeFollower`), driven by rank 0's connector.
    def kv_address(self) -> str:
        return self.runner.hook.receiver.address

    def kv_expect(self, transfer_id: str, dst_block_ids: list[int], num_layers: int, head_ranges) -> None:
        self.runner.hook.expect(transfer_id, dst_block_ids, num_layers, [tuple(r) for r in head_ranges])

    def kv_wait(self, transfer_id: str, timeout_s: float) -> str | None:
        return self.runner.hook.wait(transfer_id, timeout_s)

    def kv_abort(self, transfer_id: str, reason: str) -> None:
        self.runner.hook.abort(transfer_id, reason)

    def kv_metrics(self):
        hook = self.runner.hook
        return (hook.receiver if hasattr(hook, "receiver") else hook.sender).metrics()

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"tensor-parallel rank {self.spec.rank} failed: {self.error!r}")
        if not self.thread.is_alive():
            raise RuntimeError(f"tensor-parallel rank {self.spec.rank} was stopped")


# Threaded: a decode rank's `kv_wait` calls block while health checks and other calls go on.
_RankActor = ray.remote(max_concurrency=64)(TensorParallelRank)


class TensorParallelReplica:
    """Mixed into a worker class: the replica is rank 0 of a group of `tensor_parallel_size`."""

    def __init__(self, *args, tensor_parallel_size: int, rank_actor_options: dict[str, Any] | None = None,
                 **kwargs) -> None:
        self._tp_size = tensor_parallel_size
        self._tp_rank_actor_options = dict(rank_actor_options or {})
        super().__init__(*args, **kwargs)

    def _start_engine(self, config: EngineConfig, kv_connector: KVConnector | None) -> TensorParallelEngine:
        from tandem.workers.disagg import DecodeConnector, PrefillConnector
        from tandem.workers.tp_disagg import decode_follower, prefill_follower

        if kv_connector is None:
            return start_group(config, self._tp_size, self._tp_rank_actor_options)
        # The followers run on this replica's node (one STRICT_PACK placement group): the same
        # transfer settings (this node's address, free ports, their own worker ids) serve them.
        if isinstance(kv_connector, PrefillConnector):
            return start_group(config, self._tp_size, self._tp_rank_actor_options, kv_connector,
                               functools.partial(prefill_follower, kv_connector.transfer_config))
        if not isinstance(kv_connector, DecodeConnector):
            raise ValueError(f"{type(kv_connector).__name__} does not move KV with tensor parallelism")
        engine = start_group(config, self._tp_size, self._tp_rank_actor_options, kv_connector,
                             functools.partial(decode_follower, kv_connector.transfer_config))
        kv_connector.attach_ranks(engine.ranks)
        return engine

    def tensor_parallel_size(self) -> int:
        """The degree rank 0's runner really runs with."""
        return self._engine.engine.runner.tensor_parallel_size

    def rank_actor_names(self) -> list[str]:
        """The Ray actor names (namespace `RANK_NAMESPACE`) of ranks 1..N-1."""
        replica_id = self._engine.group.specs[0].replica_id
        return [rank_actor_name("tp", replica_id, r) for r in range(1, self._tp_size)]

    async def check_health(self) -> None:
        try:
            await self._engine.check_ranks()
        except RankLostError as error:
            self._end_replica(str(error))
        await super().check_health()


class TensorParallelLLMWorker(TensorParallelReplica, LLMWorker):
    pass


class TensorParallelPrefillWorker(TensorParallelReplica, PrefillWorker):
    pass


class TensorParallelDecodeWorker(TensorParallelReplica, DecodeWorker):
    pass


TENSOR_PARALLEL_WORKERS = {LLMWorker: TensorParallelLLMWorker, PrefillWorker: TensorParallelPrefillWorker,
                           DecodeWorker: TensorParallelDecodeWorker}
