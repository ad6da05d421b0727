"""Starting local Ray clusters in tests, with a second try when a node misses Ray's start-up
deadline.

Ray gives a new raylet a fixed 30 s to register with the GCS (a constant in
`ray/_private/node.py`, unlike the GCS port wait that tests/conftest.py raises through its
environment variable). On the busy 2-core CI machine one start missed it (CI of 2026-12-07: a
module errored at set-up with "The current node timed out during startup"). Before the second try
the processes the failed start left behind are killed, so they hold no ports and take no CPU from
the new cluster.

A connection an earlier test left open is closed first: `ray.init` of a new cluster would
otherwise raise "Maybe you called ray.init twice" (CI of 2026-12-07, six tests of two modules)."""
from __future__ import annotations

from typing import Callable, TypeVar

import psutil
import ray

T = TypeVar("T")

NODE_START_TIMEOUT = "timed out during startup"


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def start_ray(start: Callable[[], T], attempts: int = 2) -> T:
    """Runs `start` (a `ray.init`, or a whole `Cluster` and the `ray.init` joining it); when it
    fails because a node timed out during start-up, kills what it started and runs it again."""
    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(1, attempts + 1):
        before = _descendants()
        try:
            return start()
        except Exception as exc:
            if NODE_START_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()
            left = [p for pid, p in _descendants().items() if pid not in before]
            for process in left:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=10)
    raise AssertionError("unreachable")


def init_local(**kwargs) -> None:
    """`ray.init(**kwargs)` for a cluster of the test's own, tried twice."""
    start_ray(lambda: ray.init(**kwargs))
