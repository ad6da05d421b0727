"""The request router inside a real local Ray Serve: three worker replicas that really cache
what they are asked and publish it through the KV-event contract, a real index actor, and
Serve's own handle routing. Requests sharing a prefix must land on the replica that holds it;
round robin must spread them."""
from __future__ import annotations

import time

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from tandem.router.index_actor import INDEX_NAMESPACE, index_actor_name
from tandem.protocol.kv_events import BlocksStored
from tandem.protocol.load import ReplicaLoad
from tandem.router.publisher import KVEventPublisher
from tandem.router.request_router import TandemRequestRouter
from tandem.protocol.prefix_hash import hash_full_blocks
from tests.ray_start import init_local

BLOCK_SIZE = 4
TOTAL_KV_BLOCKS = 1024


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
class CachingWorker:
    """Stands in for a worker's prefix cache: it keeps every full block it was asked about."""

    def __init__(self) -> None:
        self._publisher = KVEventPublisher.for_current_replica()
        self._cached: list[int] = []  # one growing set, kept in insertion order
        self._cached_set: set[int] = set()

    async def generate(self, request: dict) -> str:
        chain = hash_full_blocks(request["prompt_token_ids"], BLOCK_SIZE)
        first_new = next((i for i, h in enumerate(chain) if h not in self._cached_set), len(chain))
        if first_new < len(chain):
            parent = chain[first_new - 1] if first_new else None
            new_blocks = chain[first_new:]
            self._cached.extend(new_blocks)
            self._cached_set.update(new_blocks)
            # Waiting for the index to take the batch keeps the test free of sleeps.
            await self._publisher.publish([BlocksStored(new_blocks, parent)])
        await self._publisher.report_load(
            ReplicaLoad(self._publisher.replica_id, 0, 0, 0, 0, TOTAL_KV_BLOCKS - len(self._cached), TOTAL_KV_BLOCKS, time.time())
        )
        return self._publisher.replica_id


def deploy(app_name: str, policy: str):
    config = RequestRouterConfig(
        request_router_class=TandemRequestRouter,
        request_router_kwargs={"policy": policy, "block_size": BLOCK_SIZE},
    )
    app = CachingWorker.options(request_router_config=config).bind()
    return serve.run(app, name=app_name, route_prefix=None)


@pytest.fixture(scope="module")
def handles():
    init_local(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield {"prefix": deploy("prefix", "prefix_aware"), "rr": deploy("rr", "round_robin")}
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(handle, tokens: list[int], session_id: str | None = None) -> str:
    return handle.generate.remote({"prompt_token_ids": tokens, "session_id": session_id}).result(timeout_s=30)


def test_requests_sharing_a_prefix_land_on_the_replica_holding_it(handles):
    handle = handles["prefix"]
    documents = [list(range(k * 1000, k * 1000 + 64)) for k in range(3)]  # 16 blocks each
    holders = []
    for document in documents:
        holder = ask(handle, document + [1, 2, 3])
        holders.append(holder)
        for question in range(5):
            assert ask(handle, document + [question] * 9) == holder
    # Nothing cached yet and load even: first requests of new prefixes do not pile up.
    assert len(set(holders)) == 3

    index = ray.get_actor(index_actor_name("prefix/CachingWorker"), namespace=INDEX_NAMESPACE)
    stats = ray.get(index.stats.remote())
    assert stats["policy"] == "prefix_aware" and stats["num_bad_payloads"] == 0
    matched = ray.get(index.match.remote(hash_full_blocks(documents[0], BLOCK_SIZE)))
    assert matched == {holders[0]: 16}


def test_session_id_keeps_a_conversation_on_one_replica(handles):
    handle = handles["prefix"]
    replicas = {ask(handle, [50_000 + turn * 7 + i for i in range(12)], session_id="conversation-9") for turn in range(6)}
    assert len(replicas) == 1


def test_round_robin_spreads_a_shared_prefix(handles):
    handle = handles["rr"]
    document = list(range(64))
    ask(handle, document)  # warm-up: the handle's router has seen all replicas
    replicas = [ask(handle, document + [i] * 5) for i in range(6)]
    assert len(set(replicas)) == 3
    assert all(replicas.count(r) == 2 for r in replicas)
    assert all(a != b for a, b in zip(replicas, replicas[1:]))
