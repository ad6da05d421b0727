"""Disaggregated tensor parallelism on a multi-node Ray cluster on this machine: a head, a node
carrying the custom resource `prefill`, one carrying `decode` (the app built as `tandem serve
--pool-resources` builds it). Prefill/decode degrees 2 -> 1, 1 -> 2 and 2 -> 2 each give the
offline TP=1 engine's greedy tokens (the colocated TP=1 tokens: `test_tp_replica.py` shows they
are the same); every prompt's KV crossed from the prefill node to the decode node, in one message
per rank pair per request (2 KV heads: 2 rank pairs in each case; all layers in one message).
Last, a prefill rank is SIGKILLed mid-run: every request still completes with the offline
tokens, the decode side (the surviving one) holds no block afterwards, and Serve replaces the
prefill group, whose KV crosses again. Slow: a cluster of three raylets and six
tensor-parallel groups."""
from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from tandem.engine.llm import LLM
from tandem.engine.make_model import make_model
from tandem.protocol.sampling_params import SamplingParams
from tandem.workers.app import AppArgs, _decode_pool
from tandem.workers.rank_group import RANK_NAMESPACE
from tests.ray_start import start_ray
from tests.router.serve_harness import greedy_tokens

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEGREES = [(2, 1), (1, 2), (2, 2)]  # (prefill, decode)
ENGINE = {"num_kv_blocks": 128, "block_size": 16, "max_model_len": 512, "max_num_batched_tokens": 64}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = str(make_model(tmp_path_factory.mktemp("tp-multinode") / "llama", "llama", seed=1))

    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        nodes = {"prefill": cluster.add_node(num_cpus=2, resources={"prefill": 6}).node_id,
                 "decode": cluster.add_node(num_cpus=2, resources={"decode": 6}).node_id}
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        return cluster, nodes

    ray_cluster, nodes = start_ray(start)
    serve.start(proxy_location="Disabled")
    try:
        serve.run_many([serve.RunTarget(_decode_pool(AppArgs.from_dict({
            "model": model, "mode": "disaggregated", "pool_resources": True, "worker_num_cpus": 0.2,
            "health_check_period_s": 1,
            "engine_kwargs": ENGINE, "prefill_tensor_parallel_size": p, "tensor_parallel_size": d,
            "disagg": {"remote_prefill_min_tokens": 8}}), model), f"tpd{p}{d}", None) for p, d in DEGREES])
        yield {"model": model, "nodes": nodes}
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()


def _generate(app: str, rid: str, prompt: list[int]) -> list[int]:
    return greedy_tokens(app, "DecodeWorker", rid, prompt, MAX_TOKENS)


def _ranks(app: str, deployment: str) -> list:
    handle = serve.get_deployment_handle(deployment, app)
    return [ray.get_actor(name, namespace=RANK_NAMESPACE)
            for name in handle.rank_actor_names.remote().result(timeout_s=30)]


def _node(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)


@pytest.mark.parametrize("prefill_tp, decode_tp", DEGREES)
def test_tp_groups_on_their_nodes_give_the_tokens_of_tp1(cluster, prefill_tp, decode_tp):
    app = f"tpd{prefill_tp}{decode_tp}"
    rng = random.Random(11)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(20, 150))] for _ in range(6)]
    llm = LLM(cluster["model"], dtype="float32", **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(lambda ip: _generate(app, f"{app}-{ip[0]}", ip[1]), enumerate(prompts)))
    assert served == offline
    prefill_ranks = _ranks(app, "PrefillWorker") if prefill_tp > 1 else []
    decode_ranks = _ranks(app, "DecodeWorker") if decode_tp > 1 else []
    assert len(prefill_ranks) == prefill_tp - 1 and len(decode_ranks) == decode_tp - 1
    assert all(_node(a) == cluster["nodes"]["prefill"] for a in prefill_ranks)
    assert all(_node(a) == cluster["nodes"]["decode"] for a in decode_ranks)
    decode = serve.get_deployment_handle("DecodeWorker", app).stats.remote().result(timeout_s=30)
    assert decode.disagg.remote_prefills_ok == len(prompts) and decode.disagg.remote_prefills_failed == 0
    received = [decode.transfer] + ray.get([a.kv_metrics.remote() for a in decode_ranks], timeout=30)
    assert sum(m.messages_received for m in received) == 2 * len(prompts)  # rank pairs x 1 layer group
    assert all(m.transfers_ok == len(prompts) for m in received)
    prefill = serve.get_deployment_handle("PrefillWorker", app).stats.remote().result(timeout_s=30)
    sent = [prefill.transfer] + ray.get([a.kv_metrics.remote() for a in prefill_ranks], timeout=30)
    assert sum(m.messages_sent for m in sent) == 2 * len(prompts)
    assert prefill.exports_ok == len(prompts) and prefill.exports_failed == 0


def _settled(read, ok, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not ok(value := read()):
        assert time.monotonic() < deadline, f"{what}: {value}"
        time.sleep(0.2)
    return value


def test_a_prefill_rank_killed_mid_run_loses_no_request_and_no_decode_block(cluster):
    app = "tpd22"
    decode = serve.get_deployment_handle("DecodeWorker", app)
    prefill = serve.get_deployment_handle("PrefillWorker", app)
    (victim,) = _ranks(app, "PrefillWorker")
    victim_name = prefill.rank_actor_names.remote().result(timeout_s=30)
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    rng = random.Random(12)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(60, 150))] for _ in range(8)]
    llm = LLM(cluster["model"], dtype="float32", **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    started = decode.stats.remote().result(timeout_s=30).disagg.remote_prefills_started
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_generate, app, f"kill-{i}", p) for i, p in enumerate(prompts)]
        _settled(lambda: decode.stats.remote().result(timeout_s=30).disagg.remote_prefills_started,
                 lambda n: n > started, 60, "no remote prefill started")
        os.kill(pid, signal.SIGKILL)
        served = [f.result(timeout=300) for f in futures]
    assert served == offline  # each prompt's KV crossed, or was recomputed on the decode side
    _settled(lambda: decode.stats.remote().result(timeout_s=30).engine,
             lambda e: e.num_free_blocks == e.num_total_blocks, 60, "decode blocks held")

    def names():  # a call may meet the dying replica, or wait for the new one to start
        try:
            return prefill.rank_actor_names.remote().result(timeout_s=30)
        except (TimeoutError, ray.exceptions.RayError):
            return None

    _settled(names, lambda n: n is not None and n != victim_name, 180, "the prefill group was not replaced")
    ok = decode.stats.remote().result(timeout_s=30).disagg.remote_prefills_ok
    deadline = time.monotonic() + 120
    while True:  # the new group serves remote prefills (once Serve routes to it); fresh prompts, no cache hit
        prompt = [rng.randrange(5, 600) for _ in range(80)]
        assert _generate(app, f"after-kill-{time.monotonic()}", prompt) == \
            llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
        if decode.stats.remote().result(timeout_s=30).disagg.remote_prefills_ok > ok:
            break
        assert time.monotonic() < deadline, "no remote prefill succeeded after the prefill group was replaced"
        time.sleep(1)
