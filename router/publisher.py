"""The worker's side of the KV-event contract: send event batches and load to the pool's index.

A worker (a Serve replica of the prefill or decode deployment) makes one `KVEventPublisher`,
records events as its prefix cache changes, and flushes once per engine step:

    publisher = KVEventPublisher.for_current_replica()
    publisher.record(BlocksStored(block_hashes, parent_hash))
    publisher.flush()
    publisher.report_load(ReplicaLoad(publisher.replica_id, ...))

Sends are fire-and-forget (Ray keeps one caller's calls to one actor in order); each returns
the call's ObjectRef for callers that want to wait. A new publisher starts again at sequence 0,
which the index reads as a restart and drops this replica's old view.
"""
from __future__ import annotations

import time

import ray

from tandem.router.index_actor import get_index_actor, pool_name
from tandem.protocol.kv_events import KVEvent, KVEventBatch, encode_batch
from tandem.protocol.load import ReplicaLoad, encode_load


class KVEventPublisher:
    def __init__(self, pool: str, replica_id: str) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self._next_seq = 0
        self._pending: list[KVEvent] = []
        self._index: ray.actor.ActorHandle | None = None

    @classmethod
    def for_current_replica(cls, pool: str | None = None) -> KVEventPublisher:
        """Inside a Serve replica: its own replica id, and its deployment's pool by default."""
        from ray import serve

        context = serve.get_replica_context()
        replica_id = context.replica_id.to_full_id_str()
        return cls(pool or pool_name(context.app_name, context.deployment), replica_id)

    def record(self, event: KVEvent) -> None:
        self._pending.append(event)

    def flush(self) -> ray.ObjectRef | None:
        """Send the recorded events as one batch (nothing when there are none)."""
        if not self._pending:
            return None
        batch = KVEventBatch(self.replica_id, self._next_seq, self._pending, time.time())
        self._pending = []
        self._next_seq += 1
        return self._actor().publish.remote(encode_batch(batch))

    def publish(self, events: list[KVEvent]) -> ray.ObjectRef | None:
        for event in events:
            self.record(event)
        return self.flush()

    def report_load(self, load: ReplicaLoad) -> ray.ObjectRef:
        if load.replica_id != self.replica_id:
            raise ValueError(f"load of {load.replica_id!r} reported by {self.replica_id!r}")
        return self._actor().report_load.remote(encode_load(load))

    def _actor(self) -> ray.actor.ActorHandle:
        if self._index is None:
            self._index = get_index_actor(self.pool)
        return self._index
