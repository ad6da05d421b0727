"""A real local Ray + Serve with its HTTP proxy on a free loopback port, for endpoint tests."""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import ray
from ray import serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_serve() -> Iterator[str]:
    """Yields the base URL; shuts Serve and Ray down afterwards."""
    port = free_port()
    # "local": a new cluster even when another run on this machine has one up.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
