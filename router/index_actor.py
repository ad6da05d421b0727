"""`PrefixIndexActor`: the one place a pool's prefix index, loads and policy live at run time.

Why a named Ray actor: workers (Serve replicas) and routers (inside every process that holds a
handle to the pool: the HTTP proxy, ingress replicas, drivers) are different processes, and
the routers of one pool must agree on one view and one session map. One named, detached actor
per pool gives that with nothing but Ray: workers push msgpack event batches and load reports
to it (fire-and-forget, ordered per caller), routers ask it to rank replicas (one small call
per request). It is a view: if it dies, Ray restarts it empty and the events refill it.

Pools are named `"<app>/<deployment>"` by default, so a worker and the router of its own
deployment find the same actor without configuration.
"""
from __future__ import annotations

import logging
import time

import ray

from tandem.protocol.kv_events import decode_batch
from tandem.protocol.load import decode_load
from tandem.router.policy import RoutingConfig, RoutingRequest
from tandem.router.pool import PoolRouter

logger = logging.getLogger(__name__)

INDEX_NAMESPACE = "tandem"


def pool_name(app_name: str, deployment_name: str) -> str:
    return f"{app_name}/{deployment_name}"


def index_actor_name(pool: str) -> str:
    return f"tandem-prefix-index:{pool}"


@ray.remote(num_cpus=0, max_restarts=-1)
class PrefixIndexActor:
    """Hosts one pool's `PoolRouter`. Methods take plain values; events arrive as msgpack."""

    def __init__(self, pool: str) -> None:
        self._pool_name = pool
        self._pool = PoolRouter(RoutingConfig())
        self._num_bad_payloads = 0
        self._num_batches = 0

    def configure(self, config_kwargs: dict) -> None:
        """Set the routing config (the routers of the pool send theirs; the index is kept)."""
        config = RoutingConfig(**config_kwargs)
        if config != self._pool.config:
            self._pool.reconfigure(config)

    def publish(self, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except Exception as error:  # ValueError from validation, msgpack's own errors
            self._num_bad_payloads += 1
            logger.warning("dropping malformed KV event batch for pool %s: %s", self._pool_name, error)
            return
        self._num_batches += 1
        self._pool.publish(batch)

    def report_load(self, payload: bytes) -> None:
        try:
            load = decode_load(payload)
        except Exception as error:
            self._num_bad_payloads += 1
            logger.warning("dropping malformed load report for pool %s: %s", self._pool_name, error)
            return
        self._pool.report_load(load, time.time())

    def route(
        self,
        request_id: str,
        block_hashes: list[int],
        num_prompt_tokens: int,
        session_id: str | None,
        candidates: list[str],
    ) -> list[str]:
        request = RoutingRequest(request_id, block_hashes, num_prompt_tokens, session_id)
        return self._pool.route(request, candidates, time.time())

    def request_finished(self, request_id: str) -> None:
        self._pool.request_finished(request_id)

    def remove_replicas(self, replica_ids: list[str]) -> None:
        self._pool.remove_replicas(replica_ids)

    def match(self, block_hashes: list[int]) -> dict[str, int]:
        return self._pool.match(block_hashes)

    def stats(self) -> dict[str, int | str]:
        index = self._pool.index
        return {
            "pool": self._pool_name,
            "policy": self._pool.config.policy,
            "num_blocks": index.num_blocks,
            "num_batches": self._num_batches,
            "num_bad_payloads": self._num_bad_payloads,
            "num_dropped_blocks": index.num_dropped_blocks,
            "num_evicted_blocks": index.num_evicted_blocks,
            "num_view_drops": index.num_view_drops,
        }


def get_index_actor(pool: str) -> ray.actor.ActorHandle:
    """The pool's index actor, created on first use by whoever asks first (worker or router)."""
    return PrefixIndexActor.options(
        name=index_actor_name(pool),
        namespace=INDEX_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote(pool)
