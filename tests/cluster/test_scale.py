"""`tandem scale` on running apps (a local Ray, real Serve, the tiny random model, CPU): resizing
one pool changes only that deployment's replica count. Every other replica (the ingress, the
other pool, the resized pool's existing replicas) keeps its actor and its prefix cache, requests
flow throughout with none lost, and a pool the app does not have is one clear error line."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import ray
import requests
from ray import serve

from tandem.cluster import scale_cli
from tandem.cluster.apps import POOLS, deploy_app, status_report
from tandem.cluster.cli import build_parser
from tandem.cluster.serve_cli import app_args
from tandem.router.openai_metrics import STATS_NAMESPACE, stats_board_name
from tandem.engine.make_model import make_model
from tests.ray_start import init_local
from tests.router.serve_harness import free_port

DISAGG, COLOCATED = "scale-disagg", "scale-colo"
pytestmark = pytest.mark.timeout(300)
# One document every request starts with (146 tokens: 9 full blocks for the prefix caches),
# then a unique tail of about 90 tokens: over the decode worker's 64-token threshold, so every
# prompt also goes through the prefill pool, whose cache holds the document too.
DOCUMENT = "Shared context: " + " ".join(f"Fact {i}: the quick brown fox jumps over the lazy dog." for i in range(8))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("scale") / "llama", "llama", seed=7))
    # "local": a cluster of its own even when another run on this machine has one up; its CPU
    # count is a scheduling unit (two apps: 2 ingresses + 4 engine replicas at most).
    init_local(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = ["--model", model_dir, "--served-model-name", "tiny", "--engine-arg", "num_kv_blocks=256",
                  "--engine-arg", "max_model_len=512"]
        deploy_app(DISAGG, serve_args(*common, "--prefill", "1", "--decode", "1"))  # as `tandem serve` does
        deploy_app(COLOCATED, serve_args(*common, "--colocated", "1"), route_prefix="/colocated")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_args(*flags: str) -> dict:
    return app_args(build_parser().parse_args(["serve", *flags]))


def tandem_scale(*argv: str) -> int:
    """`tandem scale ...` in this process (its Ray connection is the test's)."""
    return scale_cli.run(build_parser().parse_args(["scale", *argv]))


def replica_actors(app: str) -> dict[str, dict[str, str]]:
    """deployment -> {Serve replica id (the replica actor's name): actor id} of live replicas."""
    found: dict[str, dict[str, str]] = {}
    for actor_id, info in ray._private.state.actors().items():
        name = info["Name"] or ""
        if info["State"] == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app}#"):
            deployment = name.split("#")[1]
            found.setdefault(deployment, {})[name] = actor_id
    return found


def prefix_hits(app: str) -> dict[str, int]:
    """Serve replica id -> its engine's prefix-cache hits so far (the stats board `tandem status` reads)."""
    board = ray.get_actor(stats_board_name(app), namespace=STATS_NAMESPACE)
    return {replica: stats["prefix_cache_hits"] for replica, stats in ray.get(board.snapshot.remote()).items()}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


class Traffic:
    """Client threads sending completions until stopped, each prompt the shared document plus a
    unique tail; every answer and every failure is counted."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def _run(self) -> None:
        with requests.Session() as client:
            while not self.stop.is_set():
                prompt = f"{DOCUMENT} Question {' '.join(uuid.uuid4().hex for _ in range(3))}?"
                try:
                    reply = client.post(self.url + "/v1/completions", timeout=120, json={
                        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
                    if reply.status_code != 200:
                        raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")
                    assert reply.json()["usage"]["completion_tokens"] >= 1, reply.text
                    with self.lock:
                        self.ok += 1
                except Exception as error:  # counted, asserted on by the test
                    with self.lock:
                        self.failures.append(repr(error))

    def answered(self) -> int:
        with self.lock:
            return self.ok


def test_scale_decode_up_and_down_keeps_every_other_replica_and_its_cache(url):
    before = replica_actors(DISAGG)
    assert {d: len(r) for d, r in before.items()} == {"OpenAIIngress": 1, "PrefillWorker": 1, "DecodeWorker": 1}
    [prefill] = before["PrefillWorker"]
    [original_decode] = before["DecodeWorker"]
    with Traffic(url) as traffic:
        wait_for(lambda: traffic.answered() >= 4, 120, "the first answers")
        hits = wait_for(lambda: (h := prefix_hits(DISAGG)).get(prefill) and h.get(original_decode) and h, 30,
                        "prefix hits on both pools")

        assert tandem_scale("decode", "2", "--app-name", DISAGG) == 0
        during = replica_actors(DISAGG)
        assert len(during["DecodeWorker"]) == 2
        assert {d: r for d, r in during.items() if d != "DecodeWorker"} == \
            {d: r for d, r in before.items() if d != "DecodeWorker"}  # the ingress and prefill: same actors
        assert during["DecodeWorker"][original_decode] == before["DecodeWorker"][original_decode]
        answered = traffic.answered()
        hits = wait_for(lambda: (h := prefix_hits(DISAGG))[prefill] > hits[prefill]
                        and h[original_decode] > hits[original_decode] and h, 60,
                        "prefix hits growing on the prefill replica and the original decode replica")
        wait_for(lambda: traffic.answered() >= answered + 4, 60, "answers with two decode replicas")

        assert tandem_scale("decode", "1", "--app-name", DISAGG) == 0
        assert replica_actors(DISAGG) == before  # the new replica left; the original one stayed
        answered = traffic.answered()
        wait_for(lambda: (h := prefix_hits(DISAGG))[prefill] > hits[prefill]
                 and h[original_decode] > hits[original_decode], 60, "prefix hits still growing")
        wait_for(lambda: traffic.answered() >= answered + 4, 60, "answers after the scale-down")
    assert traffic.failures == [], traffic.failures[:5]
    assert replica_actors(DISAGG) == before
    report = status_report(DISAGG)
    assert report["args"]["num_replicas"] == 1
    assert report["deployments"]["DecodeWorker"]["engine"]["prefix_hit_rate"] > 0  # `tandem status`: not "-"


def test_scale_colocated_at_its_count_restarts_nothing(url):
    before = replica_actors(COLOCATED)
    assert {d: len(r) for d, r in before.items()} == {"OpenAIIngress": 1, "LLMWorker": 1}
    assert tandem_scale("colocated", "1", "--app-name", COLOCATED) == 0
    time.sleep(2.0)  # a replacement would be starting by now
    assert replica_actors(COLOCATED) == before
    reply = requests.post(url + "/colocated/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("pool", ["decode", "prefill"])
def test_a_pool_the_colocated_app_lacks_is_one_error_line(url, pool, capsys):
    before = replica_actors(COLOCATED)
    assert tandem_scale(pool, "2", "--app-name", COLOCATED) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tandem scale: ") and f"has no {pool} pool" in lines[0], lines
    assert "colocated" in lines[0]
    assert replica_actors(COLOCATED) == before
    assert status_report(COLOCATED)["args"]["num_replicas"] == 1


def test_an_app_that_autoscales_is_not_scaled_by_hand(url, capsys):
    """Its policies size its pools (Serve turns external scaling off for such an app): `tandem
    scale` says so and changes nothing. (Redeploys the colocated app: keep this test last.)"""
    from tandem.workers.app import POOL_DEPLOYMENTS

    args = dict(status_report(COLOCATED)["args"], autoscaling={"colocated": {"min_replicas": 1, "max_replicas": 1}})
    deploy_app(COLOCATED, args, route_prefix="/colocated")
    before = replica_actors(COLOCATED)
    capsys.readouterr()
    assert tandem_scale("colocated", "2", "--app-name", COLOCATED) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "autoscales its colocated pool" in line and "tandem serve" in line
    assert replica_actors(COLOCATED) == before
    assert status_report(COLOCATED)["args"]["autoscaling"] == args["autoscaling"]
    assert set(POOLS) == set(POOL_DEPLOYMENTS)
