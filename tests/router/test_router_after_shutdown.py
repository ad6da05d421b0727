"""A handle's request router that outlives the process's Ray connection (a driver that called
`ray.shutdown()` while a request's completion was still on its way) tells the index nothing and
starts no cluster: a Ray call there would start a new local Ray behind the user's back (CI of
2026-12-07: one did, in the test process, and the next module's `ray.init` failed)."""
from __future__ import annotations

import ray
import ray._private.auto_init_hook as auto_init_hook
from ray.serve._private.common import DeploymentID, ReplicaID

from tandem.router.index_actor import get_index_actor
from tandem.router.request_router import TandemRequestRouter
from tests.ray_start import init_local


def test_a_completion_after_ray_shutdown_starts_no_cluster(monkeypatch):
    # What a user's process has (the suite turns Ray's auto-init off: tests/conftest.py).
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)
    replica = ReplicaID("r", DeploymentID("d", "a"))
    init_local(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        router = TandemRequestRouter.__new__(TandemRequestRouter)  # Serve's constructor needs a controller
        router._index = get_index_actor("after-shutdown/pool")
        router.on_request_completed(replica, "request-1")  # connected: sent
    finally:
        ray.shutdown()
    router.on_request_completed(replica, "request-2")
    try:
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
