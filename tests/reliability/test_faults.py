"""Faults on a real local Serve app (two `LLMWorker` replicas behind the OpenAI ingress): an
engine replica killed while it streams, with stream migration off (`max_migrations=0`), which is
also what a stream gets once its migrations are used up. Its streaming clients get a clean SSE
error at once (never a hang); its non-streamed clients get a full completion, sent again to the
live replica (nothing had been sent to them yet); the other replica's clients never notice;
Serve brings a new replica up and it serves. With migration on (the default), the streams
continue instead: `test_migration.py`.

Killing a prefill replica mid-run is `tests/workers/test_disagg.py::
test_killing_the_prefill_replica_mid_run_completes_every_request`; a dead or stalled KV peer is
`test_kv_peer_faults.py`."""
from __future__ import annotations

import threading
import time

import pytest
import ray
import requests
from ray import serve

from tests.reliability.conftest import app_at
from tests.reliability.probes import metric_values, post, replica_names, sse_events

APP = "faults"
ENGINE = {"max_model_len": 1024, "num_kv_blocks": 512, "max_num_seqs": 16}
STREAM_TOKENS = 900  # long enough that the kill lands mid-stream (a few hundred tokens/s here)
BLOCKING_TOKENS = 400
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def base_url(ray_serve):
    with app_at(ray_serve, APP, num_replicas=2, routing_policy="round_robin", engine_kwargs=ENGINE,
                max_migrations=0) as url:
        yield url


class _Stream(threading.Thread):
    """A streamed completion read in the background: replica, first chunk, every event, timings."""

    def __init__(self, url: str, prompt: str) -> None:
        super().__init__(daemon=True)
        self.body = {"prompt": prompt, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0,
                     "stream": True, "stream_options": {"include_usage": True}}
        self.url = url
        self.replica: str | None = None
        self.first_chunk = threading.Event()
        self.events: list[object] = []
        self.ended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with post(self.url, self.body, stream=True, timeout=(10, 30)) as response:
                assert response.status_code == 200, response.text
                self.replica = response.headers["x-tandem-replica"]
                for line in response.iter_lines():
                    if line.startswith(b"data: "):
                        self.events.append(line[len(b"data: "):])
                        self.first_chunk.set()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.ended_at = time.monotonic()
            self.first_chunk.set()


def _completion_tokens(events) -> int | None:
    import json

    decoded = [json.loads(e) for e in events if e != b"[DONE]"]
    usage = [e["usage"] for e in decoded if e.get("usage")]
    return usage[-1]["completion_tokens"] if usage else None


def test_killing_a_decode_replica_mid_stream(base_url):
    url = f"{base_url}/v1/completions"
    replicas_before = replica_names(APP, "LLMWorker")
    assert len(replicas_before) == 2
    retries_before = metric_values(base_url).get("tandem_ingress_replica_retries_total", 0)

    streams = [_Stream(url, f"stream {i}: the router keeps each conversation") for i in range(4)]
    for stream in streams:
        stream.start()
    blocking: dict[int, requests.Response | BaseException] = {}

    def blocking_request(i: int) -> None:
        try:
            blocking[i] = post(url, {"prompt": f"blocking {i}: hello", "max_tokens": BLOCKING_TOKENS,
                                     "ignore_eos": True, "temperature": 0}, timeout=(10, 90))
        except BaseException as error:  # noqa: BLE001
            blocking[i] = error

    blockers = [threading.Thread(target=blocking_request, args=(i,), daemon=True) for i in range(4)]
    for thread in blockers:
        thread.start()
    for stream in streams:
        assert stream.first_chunk.wait(60) and stream.error is None, stream.error
    victim = streams[0].replica
    assert victim in replicas_before, (victim, replicas_before)
    on_victim = [s for s in streams if s.replica == victim]
    elsewhere = [s for s in streams if s.replica != victim]
    assert elsewhere, "round robin put every stream on one replica"
    time.sleep(0.3)  # let the blocking requests reach the replicas too

    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    for stream in streams:
        stream.join(90)
        assert not stream.is_alive(), "a stream hung after the kill"
        assert stream.error is None, stream.error
    for stream in on_victim:  # a clean SSE error, promptly, and no [DONE]
        assert stream.events[-1] != b"[DONE]"
        import json

        error = json.loads(stream.events[-1])["error"]
        assert error["code"] == "replica_died" and error["type"] == "server_error", error
        assert stream.ended_at - killed_at < 10, stream.ended_at - killed_at
        assert (_completion_tokens(stream.events) or 0) < STREAM_TOKENS  # it really died mid-stream
    for stream in elsewhere:  # the other replica's clients finish as if nothing happened
        assert stream.events[-1] == b"[DONE]"
        assert _completion_tokens(stream.events) == STREAM_TOKENS

    for thread in blockers:
        thread.join(120)
        assert not thread.is_alive(), "a non-streamed request hung after the kill"
    for i, reply in blocking.items():  # retried on the live replica when theirs died
        assert isinstance(reply, requests.Response), reply
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == BLOCKING_TOKENS
        assert reply.headers["x-tandem-replica"] != victim
    retries = metric_values(base_url)["tandem_ingress_replica_retries_total"] - retries_before
    assert retries >= 1, "no non-streamed request was in flight on the killed replica"
    print(f"\nfaults: {len(on_victim)} streams lost (clean SSE error), {len(elsewhere)} unaffected, "
          f"{len(blocking)} non-streamed completed ({int(retries)} retried)")


def test_the_killed_replica_is_replaced_and_the_app_serves(base_url):
    url = f"{base_url}/v1/completions"
    # New requests succeed at once, while Serve replaces the replica.
    for _ in range(4):
        reply = post(url, {"prompt": "after the kill", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 90
    while True:
        status = serve.status().applications[APP].deployments["LLMWorker"]
        # Serve's status and the GCS's named actors are read separately: on a busy machine the
        # status has shown the new replica RUNNING before its actor name was listed.
        replicas = set(replica_names(APP, "LLMWorker"))
        if (status.replica_states.get("RUNNING") == 2 and str(status.status).endswith("HEALTHY")
                and len(replicas) == 2):
            break
        assert time.monotonic() < deadline, f"the replica was not replaced: {status}, named: {replicas}"
        time.sleep(0.5)
    served_by: set[str] = set()
    deadline = time.monotonic() + 30
    while served_by != replicas:  # round robin: both, the new one included, answer
        reply = post(url, {"prompt": "hello again", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
        served_by.add(reply.headers["x-tandem-replica"])
        assert time.monotonic() < deadline, (served_by, replicas)
