"""One pool's routing state: its prefix index, its replicas' load, and the policy over them.

Pure Python (no Ray): `PrefixIndexActor` hosts one of these per pool, and the routing
simulator can drive one directly. Times are passed in, so it is deterministic under test.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from tandem.protocol.kv_events import KVEventBatch
from tandem.protocol.load import ReplicaLoad
from tandem.router.load import LoadTracker
from tandem.router.policy import RoutingConfig, RoutingPolicy, RoutingRequest
from tandem.router.prefix_index import PrefixIndex


class PoolRouter:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.index = PrefixIndex(max_blocks=config.max_index_blocks)
        self.loads = LoadTracker(in_flight_ttl_s=config.in_flight_ttl_s)
        self.policy = RoutingPolicy(config)
        self._last_candidates: list[str] = []
        self._sorted: list[str] = []
        self._candidate_set: frozenset[str] = frozenset()
        self._position: dict[str, int] = {}

    def reconfigure(self, config: RoutingConfig) -> None:
        """New policy settings; the index and the load view are kept."""
        self.config = config
        self.index.set_max_blocks(config.max_index_blocks)
        self.loads = LoadTracker(in_flight_ttl_s=config.in_flight_ttl_s)
        self.policy = RoutingPolicy(config)

    def publish(self, batch: KVEventBatch) -> None:
        self.index.apply_batch(batch)

    def report_load(self, load: ReplicaLoad, now: float) -> None:
        self.loads.update(load, now)

    def route(self, request: RoutingRequest, candidates: Sequence[str], now: float) -> list[str]:
        """Rank `candidates` for `request` and count it as in flight on the first one.

        The hot path: one walk of the prefix index for per-replica match lengths, one dict
        lookup per candidate for its load, then the policy over plain lists."""
        if not candidates:
            return []
        loads = self.loads
        loads.expire(now)
        replica_ids = self._sorted_candidates(candidates)
        zeros = itertools.repeat(0)
        outstanding = list(map(loads.outstanding.get, replica_ids, zeros))
        kv_usage = list(map(loads.kv_usage_of.get, replica_ids, itertools.repeat(0.0)))
        matched: dict[int, int] = {}
        host: dict[int, int] = {}
        if self.config.policy == "prefix_aware":
            position = self._position
            by_replica, host_by_replica = self.index.match_tiers(request.block_hashes, self._candidate_set)
            for replica_id, blocks in by_replica.items():
                matched[position[replica_id]] = blocks
            for replica_id, blocks in host_by_replica.items():
                host[position[replica_id]] = blocks
        ranked = self.policy.rank_lists(request, replica_ids, matched, outstanding, kv_usage, host)
        loads.on_routed(request.request_id, ranked[0], request.num_prompt_tokens, now)
        return ranked

    def _sorted_candidates(self, candidates: Sequence[str]) -> list[str]:
        """Candidates in id order (the policy rotates ties over it); cached while they repeat."""
        if not isinstance(candidates, list):
            candidates = list(candidates)
        if candidates != self._last_candidates:
            self._last_candidates = list(candidates)
            self._sorted = sorted(set(candidates))
            self._candidate_set = frozenset(self._sorted)
            self._position = {replica_id: i for i, replica_id in enumerate(self._sorted)}
        return self._sorted

    def request_finished(self, request_id: str) -> None:
        self.loads.on_finished(request_id)

    def remove_replicas(self, replica_ids: Iterable[str]) -> None:
        for replica_id in replica_ids:
            self.index.remove_replica(replica_id)
            self.loads.remove_replica(replica_id)
            self.policy.forget_replica(replica_id)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        return self.index.match(block_hashes)
