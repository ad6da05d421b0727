"""One pool's routing state: its prefix index, its replicas' load, and the policy over them.

Pure Python (no Ray): `PrefixIndexActor` hosts one of these per pool, and the routing
simulator can drive one directly. Times are passed in, so it is deterministic under test.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from router.kv_events import KVEventBatch
from router.load import LoadTracker, ReplicaLoad
from router.policy import CandidateState, RoutingConfig, RoutingPolicy, RoutingRequest
from router.prefix_index import PrefixIndex


class PoolRouter:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.index = PrefixIndex(max_blocks=config.max_index_blocks)
        self.loads = LoadTracker(in_flight_ttl_s=config.in_flight_ttl_s)
        self.policy = RoutingPolicy(config)

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
        """Rank `candidates` for `request` and count it as in flight on the first one."""
        if not candidates:
            return []
        self.loads.expire(now)
        matched_blocks = self.index.match(request.block_hashes, candidates) if self.config.policy == "prefix_aware" else {}
        states = [
            CandidateState(
                replica_id,
                matched_blocks.get(replica_id, 0),
                self.loads.outstanding_tokens(replica_id),
                self.loads.kv_usage(replica_id),
            )
            for replica_id in candidates
        ]
        ranked = self.policy.rank(request, states)
        self.loads.on_routed(request.request_id, ranked[0], request.num_prompt_tokens, now)
        return ranked

    def request_finished(self, request_id: str) -> None:
        self.loads.on_finished(request_id)

    def remove_replicas(self, replica_ids: Iterable[str]) -> None:
        for replica_id in replica_ids:
            self.index.remove_replica(replica_id)
            self.loads.remove_replica(replica_id)
            self.policy.forget_replica(replica_id)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        return self.index.match(block_hashes)
