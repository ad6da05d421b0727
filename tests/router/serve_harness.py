"""A real local Ray + Serve with its HTTP proxy on a free loopback port, for endpoint tests.

Quiet by default: a failing test's report used to carry every line the cluster printed (Serve's
two INFO access lines per request, the controller and proxy narrating each deployment, Ray's
token-authentication notice), tens of thousands of lines over the suite. Worker output is not
forwarded here (as tests/workers/test_disagg.py and tests/cluster/test_multinode.py do); set
TANDEM_TEST_RAY_LOGS=1 to forward it, or read /tmp/ray/session_latest/logs/ (serve/ holds each
replica's log)."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import ray
from ray import serve

from tandem.cluster.ray_session import quiet_ray_logging
from tests.ray_start import init_local

FORWARD_WORKER_LOGS = os.environ.get("TANDEM_TEST_RAY_LOGS") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_serve() -> Iterator[str]:
    """Yields the base URL; stops the whole local Ray (Serve with it) afterwards."""
    port = free_port()
    quiet_ray_logging()
    # "local": a new cluster even when another run on this machine has one up.
    init_local(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=FORWARD_WORKER_LOGS)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        yield f"http://127.0.0.1:{port}"
    finally:
        # Not serve.shutdown(): the cluster goes anyway, and Serve's shutdown prints Ray's
        # "Task ServeController.graceful_shutdown failed ... killed by ray.kill" as it stops.
        ray.shutdown()


def greedy_tokens(app: str, deployment: str, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    """A worker deployment's greedy tokens for `prompt` (ignore_eos), streamed through its handle."""
    from tandem.protocol.worker import WorkerRequest

    handle = serve.get_deployment_handle(deployment, app)
    request = WorkerRequest(rid, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens, finished = [], False
    for delta in handle.options(stream=True).generate.remote(request):
        assert delta.error is None, delta.error
        tokens += delta.outputs[0].token_ids
        finished = delta.finished
    assert finished
    return tokens
