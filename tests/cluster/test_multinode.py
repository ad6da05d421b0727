"""A multi-node Ray cluster on this machine (a head and three raylets: one carrying the custom
resource `prefill`, two carrying `decode`), the app deployed the way `tandem serve
--pool-resources` does it, HTTP requests flowing the whole time while `tandem scale` resizes
the decode pool up and down. No request may fail, every replica must sit on a node of its
pool, and `tandem status` must show each pool's engines."""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import pytest
import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster

from tandem.cluster.apps import deploy_app, scale_app, status_report
from tandem.workers.autoscaling import STAT_KEYS
from tandem.cluster.cli import build_parser
from tandem.cluster.serve_cli import app_args
from tandem.cluster.status_cli import format_report
from tandem.router.openai_ingress import REPLICA_HEADER
from tests.ray_start import start_ray
from tests.router.serve_harness import free_port
from tandem.engine.make_model import make_model
from tandem.workers.serve_worker import LLMWorker

APP = "multinode"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# Serve's replicas send their autoscaling metrics every 10 s by default; the controller (started
# by this test's cluster) reads these at start.
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("multinode") / "llama", "llama", seed=7))
    saved = {k: os.environ.get(k) for k in FAST_METRICS}
    os.environ.update(FAST_METRICS)  # raylets (and the processes they start) inherit these

    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        nodes = {"prefill": [cluster.add_node(num_cpus=2, resources={"prefill": 2}).node_id],
                 "decode": [cluster.add_node(num_cpus=1, resources={"decode": 1}).node_id,
                            cluster.add_node(num_cpus=1, resources={"decode": 1}).node_id]}
        ray.init(address=cluster.address, log_to_driver=False)
        return cluster, nodes

    cluster, nodes = start_ray(start)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    flags = build_parser().parse_args([
        "serve", "--model", model_dir, "--served-model-name", "tiny", "--prefill", "1", "--decode", "1",
        "--pool-resources", "--engine-arg", "num_kv_blocks=256", "--engine-arg", "max_model_len=512",
        "--app-name", APP])
    args = app_args(flags)
    try:
        deploy_app(APP, args)  # what `tandem serve` runs (blocking=False here)
        yield {"url": f"http://127.0.0.1:{port}", "nodes": nodes, "head": cluster.head_node.node_id,
               "args": args}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Traffic:
    """Client threads sending completions until stopped; long prompts go through the prefill
    pool (over the decode worker's 64-token threshold), short ones are prefilled locally."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.replicas: list[str] = []  # the decode replica of each answered request
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=120)

    def _run(self, worker: int) -> None:
        with requests.Session() as client:
            i = 0
            while not self.stop_event.is_set():
                words = 90 if i % 2 == 0 else 5
                # A unique head: no prefix is shared, so prefix-aware routing spreads by load.
                prompt = f"{uuid.uuid4().hex} client {worker}: " + " ".join(
                    f"word{(worker * 7 + i * 13 + k) % 97}" for k in range(words))
                i += 1
                try:
                    reply = client.post(self.url + "/v1/completions", timeout=120, json={
                        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
                    if reply.status_code != 200:
                        raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")
                    body = reply.json()
                    assert body["usage"]["completion_tokens"] >= 1, body
                    with self.lock:
                        self.ok += 1
                        self.replicas.append(reply.headers.get(REPLICA_HEADER, ""))
                except Exception as error:  # counted, asserted on by the test
                    with self.lock:
                        self.failures.append(repr(error))

    def served_by(self, replica_prefix: str, since: int) -> set[str]:
        """Replica ids (`SERVE_REPLICA::app#Deployment#id`) that answered since the `since`-th answer."""
        with self.lock:
            return {r for r in self.replicas[since:] if r.startswith(replica_prefix)}


def replica_nodes(deployment: str) -> list[str]:
    """Node id of every live replica actor of `deployment`."""
    nodes = []
    for info in ray._private.state.actors().values():
        if info["State"] == "ALIVE" and info["Name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#"):
            nodes.append(info["Address"]["NodeID"])
    return nodes


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.5)


def running(deployment: str) -> dict:
    return status_report(APP)["deployments"][deployment]["replicas"]


def test_scaling_the_decode_pool_under_load_loses_no_request(cluster):
    decode_nodes, prefill_nodes = set(cluster["nodes"]["decode"]), set(cluster["nodes"]["prefill"])
    with Traffic(cluster["url"]) as traffic:
        wait_for(lambda: traffic.ok >= 4, 120, "the first answers")
        assert replica_nodes("PrefillWorker")[0] in prefill_nodes
        [first_decode_node] = replica_nodes("DecodeWorker")
        assert first_decode_node in decode_nodes

        # `tandem scale decode 2`: the second replica can only go to the other decode node.
        assert scale_app(APP, "decode", 2)["num_replicas"] == 2
        wait_for(lambda: running("DecodeWorker") == {"RUNNING": 2}, 180, "two decode replicas")
        assert set(replica_nodes("DecodeWorker")) == decode_nodes
        mark = len(traffic.replicas)
        wait_for(lambda: len(traffic.served_by(f"SERVE_REPLICA::{APP}#DecodeWorker#", mark)) == 2, 90,
                 lambda: f"both decode replicas answering; seen {Counter(traffic.replicas[mark:])}")

        # `tandem status` while both pools serve: replicas, KV use, hit rate, queues per pool.
        report = wait_for(lambda: (lambda r: r if all("engine" in r["deployments"][d] for d in
                                                       ("DecodeWorker", "PrefillWorker")) else None)(
            status_report(APP)), 30, "engine stats of both pools")
        engine = report["deployments"]["DecodeWorker"]["engine"]
        assert engine["replicas"] == 2 and 0.0 <= engine["kv_usage"] <= 1.0
        assert report["deployments"]["PrefillWorker"]["engine"]["replicas"] == 1
        text = format_report(report)
        assert "DecodeWorker" in text and "kv " in text and "prefix hits" in text

        # `tandem scale decode 1`: one replica drains and leaves while requests keep coming.
        ok_before = traffic.ok
        assert scale_app(APP, "decode", 1)["num_replicas"] == 1
        wait_for(lambda: running("DecodeWorker") == {"RUNNING": 1}, 180, "one decode replica")
        wait_for(lambda: traffic.ok >= ok_before + 6, 120, "answers after the scale-down")
    assert traffic.failures == [], traffic.failures[:5]
    assert len(replica_nodes("DecodeWorker")) == 1 and replica_nodes("DecodeWorker")[0] in decode_nodes
    assert replica_nodes("PrefillWorker")[0] in prefill_nodes
    assert traffic.ok >= 12


def test_decode_pool_autoscales_on_engine_stats(cluster):
    """With the workers' `record_autoscaling_stats`, the decode pool's policy scales it up under
    concurrent load (one running sequence per replica is the target here) and back down when
    the load stops, without failing a request."""
    if not hasattr(LLMWorker, "record_autoscaling_stats"):
        pytest.skip("workers do not report record_autoscaling_stats() yet")
    handle = serve.get_deployment_handle("DecodeWorker", APP)
    reported = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    assert set(reported) == set(STAT_KEYS) and all(isinstance(v, float) for v in reported.values())
    assert 0.0 <= reported["kv_usage"] <= 1.0

    args = dict(cluster["args"], autoscaling={"decode": {
        "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 3,
        "look_back_period_s": 2,
        "targets": {"target_running_per_replica": 0.5, "target_kv_usage": 0.9, "max_kv_usage": 1.0}}})
    deploy_app(APP, args)
    wait_for(lambda: running("DecodeWorker") == {"RUNNING": 1}, 120, "the autoscaled pool at one replica")
    with Traffic(cluster["url"], threads=3) as traffic:
        wait_for(lambda: running("DecodeWorker").get("RUNNING") == 2, 180, "the policy scaling decode up")
        assert set(replica_nodes("DecodeWorker")) == set(cluster["nodes"]["decode"])
    wait_for(lambda: running("DecodeWorker") == {"RUNNING": 1}, 180, "the policy scaling decode down")
    assert traffic.failures == [], traffic.failures[:5]
