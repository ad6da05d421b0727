"""A replica made of several ranks (one per GPU): rank 0 is the Serve replica itself, ranks
1..N-1 are plain Ray actors it creates, one in each bundle of its placement group (`workers.app`
asks Serve for N identical bundles, STRICT_PACK, so the N devices are reserved together on one
node). Shared by the expert-parallel (`workers.ep_replica`) and tensor-parallel
(`workers.tp_replica`) replicas: the group's TCPStore (on rank 0's node, a free port, a prefix
unique to the replica), where each rank finds it (`RankSpec`), start-up barriers, the rank
actors' creation, health and death.

Rank actors die with the replica: the replica kills them on shutdown, Ray kills them with their
owner or their placement group. A group that loses a rank cannot step (`RankLostError`), so the
replica ends its own process when it sees the loss and Serve replaces the whole group.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray

logger = logging.getLogger("ray.serve")

GROUP_TIMEOUT_S = 120.0  # one collective (a dead or hung rank fails the others after this)
START_TIMEOUT_S = 1800.0  # every rank joined / loaded its weights (big checkpoints load slowly)
RANK_HEALTH_TIMEOUT_S = 10.0
RANK_NAMESPACE = "tandem"


@dataclass(frozen=True)
class RankSpec:
    """Where one rank finds its group."""

    rank: int
    world_size: int
    store_host: str
    store_port: int
    prefix: str
    replica_id: str
    group_timeout_s: float = GROUP_TIMEOUT_S
    start_timeout_s: float = START_TIMEOUT_S
    kind: str = "expert-parallel"  # for messages

    def connect_store(self):
        from torch.distributed import TCPStore

        return TCPStore(self.store_host, self.store_port, self.world_size, False,
                        timeout=timedelta(seconds=self.group_timeout_s))


def store_barrier(store, spec: RankSpec, name: str, check: Callable[[], None] | None = None) -> None:
    """Wait until every rank got here (long loads allowed); `check()` raises on a failed peer."""
    key = f"{spec.prefix}/barrier/{name}"
    store.add(key, 1)
    deadline = time.monotonic() + spec.start_timeout_s
    while store.add(key, 0) < spec.world_size:
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{spec.kind} rank {spec.rank}: not every rank reached {name!r} in "
                               f"{spec.start_timeout_s:.0f} s")
        time.sleep(0.01)


def current_replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # outside a Serve replica (the class used directly)
        return f"local-{uuid.uuid4().hex[:8]}"


@dataclass
class StartingGroup:
    """A group whose rank actors were created: rank 0 joins through `store` and `specs[0]`."""

    store: Any  # the TCPStore server (rank 0 keeps it alive as long as the group)
    specs: list[RankSpec]
    actors: list  # actor handles of ranks 1..N-1
    ready: list  # each actor's ready() ref

    def check_started(self) -> None:
        """Raises if a rank actor failed to start (it answered its ready() with an error)."""
        done, _ = ray.wait(self.ready, num_returns=len(self.ready), timeout=0)
        for ref in done:
            ray.get(ref)

    def wait_started(self) -> None:
        ray.get(self.ready, timeout=self.specs[0].start_timeout_s)

    def kill(self) -> None:
        kill_rank_actors(self.actors)


def start_rank_actors(kind: str, name_prefix: str, world_size: int, actor_cls, options: dict[str, Any],
                      actor_args: Callable[[RankSpec], tuple]) -> StartingGroup:
    """Host the group's store and create ranks 1..N-1 as `actor_cls(*actor_args(spec))`, each
    in its bundle of the current placement group (when there is one)."""
    from torch.distributed import TCPStore

    replica_id = current_replica_id()
    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    store = TCPStore(host, 0, world_size, True, timeout=timedelta(seconds=GROUP_TIMEOUT_S), wait_for_workers=False)
    prefix = f"{name_prefix}/{replica_id}/{uuid.uuid4().hex[:8]}"
    specs = [RankSpec(r, world_size, host, store.port, prefix, replica_id, kind=kind) for r in range(world_size)]
    actors = [_create_rank_actor(actor_cls, rank_actor_name(name_prefix, spec.replica_id, spec.rank), spec, options,
                                 actor_args(spec)) for spec in specs[1:]]
    return StartingGroup(store, specs, actors, [actor.ready.remote() for actor in actors])


def _create_rank_actor(actor_cls, name: str, spec: RankSpec, options: dict[str, Any], args: tuple):
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = dict(options)
    opts.setdefault("num_cpus", 0)
    opts.setdefault("num_gpus", 0)
    placement_group = get_current_placement_group()
    if placement_group is not None:  # a Serve replica with one bundle per rank (workers.app)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=spec.rank, placement_group_capture_child_tasks=True)
    return actor_cls.options(name=name, namespace=RANK_NAMESPACE, max_restarts=0, **opts).remote(*args)


def rank_actor_name(name_prefix: str, replica_id: str, rank: int) -> str:
    return f"tandem-{name_prefix}:{replica_id}:rank{rank}"


def kill_rank_actors(actors: Sequence) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as error:  # already gone
            logger.debug("killing a rank actor: %r", error)


class RankLostError(RuntimeError):
    """A rank actor of the group is gone: the group cannot step any more."""


class RankActorsHealth:
    """Mixed into a group's engine (the replica's view of its group): `ranks`, the actor handles
    of ranks 1..N-1, and `rank_error`, set once one of them is found dead (the group cannot step
    without it: health checks fail from then on, and Serve replaces the group)."""

    group_kind = ""  # for messages
    ranks: list
    rank_error: BaseException | None = None

    async def check_ranks(self) -> None:
        """Raises if a rank actor is gone, failed or does not answer in time."""
        try:
            await asyncio.wait_for(asyncio.gather(*(self._remote(r, a.check_health.remote())
                                                    for r, a in enumerate(self.ranks, start=1))),
                                   RANK_HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RankLostError(f"a {self.group_kind} rank did not answer its health check in "
                                f"{RANK_HEALTH_TIMEOUT_S:.0f} s") from None
        if self.rank_error is not None:
            raise RankLostError(f"a {self.group_kind} rank failed: {self.rank_error!r}")

    async def _remote(self, rank: int, ref):
        try:
            return await ref
        except ray.exceptions.RayActorError as error:
            self.rank_error = error
            raise RankLostError(f"{self.group_kind} rank {rank} is dead: {error}") from error
