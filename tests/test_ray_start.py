"""The tests' Ray start-up retry: it retries only the node start-up timeout, and kills what the
failed try left running."""
import subprocess
import sys

import pytest

from tests.ray_start import NODE_START_TIMEOUT, start_ray


def test_a_node_start_timeout_is_tried_again_and_its_leftovers_are_killed():
    spawned: list[subprocess.Popen] = []

    def start():
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        if len(spawned) == 1:
            raise Exception(f"The current node {NODE_START_TIMEOUT}. This could happen because ...")
        return "started"

    try:
        assert start_ray(start) == "started"
        assert len(spawned) == 2
        assert spawned[0].wait(timeout=10) is not None  # killed before the second try
        assert spawned[1].poll() is None  # what the successful try started is left alone
    finally:
        for process in spawned:
            process.kill()
            process.wait()


def test_other_errors_and_a_second_timeout_are_raised():
    def fails(message):
        def start():
            raise RuntimeError(message)
        return start

    with pytest.raises(RuntimeError, match="bad address"):
        start_ray(fails("bad address"))
    calls = []

    def always_times_out():
        calls.append(1)
        raise Exception(NODE_START_TIMEOUT)

    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        start_ray(always_times_out)
    assert len(calls) == 2


def test_a_connection_left_open_is_closed_before_the_start():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert start_ray(ray.is_initialized) is False  # `start` ran after the old connection closed
    finally:
        ray.shutdown()


def test_no_ray_call_starts_a_cluster_by_itself():
    import ray

    assert not ray.is_initialized()
    with pytest.raises(Exception, match="Ray has not been started yet"):
        ray.get_actor("not-there")
    assert not ray.is_initialized()
