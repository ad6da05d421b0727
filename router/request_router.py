"""Ray Serve request routers for the prefill and decode pools.

`TandemRequestRouter` is a `ray.serve.request_router.RequestRouter`. Serve builds one inside
every process holding a handle to the deployment and calls `choose_replicas` per request; it
hashes the request's prompt into block hashes, asks the pool's `PrefixIndexActor` to rank the
live replicas, and hands Serve one replica per rank, best first. Serve then sends to the first
ranked replica with a free slot (its `max_ongoing_requests`), so Serve's own capacity checks,
health checks and autoscaling keep working. If the index cannot answer in time, the request
falls back to Serve's choice among all replicas (least queue) rather than waiting.

The routed method's first positional argument (or its `request=` keyword) is the request: a
dataclass or dict with `prompt_token_ids` (list[int]) and optional `session_id` (str).

    request_router_config=RequestRouterConfig(
        request_router_class="tandem.router.request_router.TandemRequestRouter",
        request_router_kwargs={"policy": "prefix_aware", "block_size": 16},
    )

`request_router_kwargs` are `RoutingConfig` fields plus `pool` (default `"<app>/<deployment>"`)
and `route_timeout_s`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tandem.router.index_actor import get_index_actor, pool_name
from tandem.router.policy import RoutingConfig
from tandem.router.stage_timing import RouteStamps, route_stamps
from tandem.protocol.prefix_hash import hash_full_blocks

logger = logging.getLogger("ray.serve")

REQUEST_ROUTER_CLASS = "tandem.router.request_router.TandemRequestRouter"


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingKey:
    prompt_token_ids: list[int]
    session_id: str | None
    request_id: str | None = None  # names the routing stamps (router.stage_timing)


def routing_key(pending_request: PendingRequest) -> RoutingKey | None:
    """The token ids and session id of a request, or None when it carries none."""
    request: Any = pending_request.args[0] if pending_request.args else pending_request.kwargs.get("request")
    if request is None:
        return None
    if isinstance(request, Mapping):
        prompt_token_ids = request.get("prompt_token_ids")
        session_id = request.get("session_id")
        request_id = request.get("request_id")
    else:
        prompt_token_ids = getattr(request, "prompt_token_ids", None)
        session_id = getattr(request, "session_id", None)
        request_id = getattr(request, "request_id", None)
    if not isinstance(prompt_token_ids, (list, tuple)):
        return None
    return RoutingKey(list(prompt_token_ids), None if session_id is None else str(session_id),
                      request_id if isinstance(request_id, str) else None)


class TandemRequestRouter(RequestRouter):
    """Prefix- and load-aware routing over one pool, decided by the pool's index actor."""

    def initialize_state(self, pool: str | None = None, route_timeout_s: float = 1.0, **config_kwargs: Any) -> None:
        self._config = RoutingConfig(**config_kwargs)
        self._route_timeout_s = route_timeout_s
        self._pool = pool or pool_name(self._deployment_id.app_name, self._deployment_id.name)
        self._index = get_index_actor(self._pool)
        self._index.configure.remote(dataclasses.asdict(self._config))
        self._route_stamps = route_stamps()
        self._register_cleanup()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        started = time.perf_counter()
        key = routing_key(pending_request) if pending_request is not None else None
        if key is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {replica.replica_id.to_full_id_str(): replica for replica in candidate_replicas}
        block_hashes = hash_full_blocks(key.prompt_token_ids, self._config.block_size)
        hashed = time.perf_counter()
        try:
            ranked_ids = await asyncio.wait_for(
                self._index.route.remote(
                    pending_request.metadata.internal_request_id,
                    block_hashes,
                    len(key.prompt_token_ids),
                    key.session_id,
                    list(by_id),
                ),
                timeout=self._route_timeout_s,
            )
        except Exception as error:  # the index is a view: without it, route by queue length
            logger.warning("prefix index for %s did not answer (%r); routing by queue length", self._pool, error)
            return [candidate_replicas]
        if key.request_id is not None:
            self._route_stamps.put(key.request_id, RouteStamps(started, hashed, time.perf_counter()))
        return [[by_id[replica_id]] for replica_id in ranked_ids if replica_id in by_id]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tell_index("request_finished", internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        previous = set(self._replica_id_set)
        super().update_replicas(replicas)
        removed = previous - self._replica_id_set
        if removed:
            self._tell_index("remove_replicas", [r.to_full_id_str() for r in removed])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._tell_index("remove_replicas", [replica_id.to_full_id_str()])

    def _tell_index(self, method: str, *args: Any) -> None:
        """A one-way call to the index actor; none once this process has left Ray. A handle's
        router outlives `ray.shutdown()` in a driver (a request's completion can arrive after
        it), and a Ray call there would start a new local cluster behind the user's back (Ray
        auto-initializes on `.remote()`)."""
        if ray.is_initialized():
            getattr(self._index, method).remote(*args)

    def _register_cleanup(self) -> None:
        # The index actor is detached (it must outlive any one replica or router); ask the Serve
        # controller to kill it on serve.shutdown(), as Ray's own prefix router does. Best
        # effort: the method is private to Serve.
        try:
            from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            controller._register_shutdown_cleanup_actor.remote(self._index)
        except Exception as error:
            logger.debug("could not register the prefix index for cleanup: %r", error)
