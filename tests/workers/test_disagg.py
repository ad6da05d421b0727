"""Disaggregated serving on a real local Ray cluster: a head node and two worker nodes, one
carrying the `prefill` resource and one the `decode` resource; `PrefillWorker` and
`DecodeWorker` as Serve deployments pinned to them; KV over kvtransfer (gloo) between the two
replica processes. Greedy outputs must equal the colocated engine's (`workers.LLM`), through
a prefill replica being killed and the decode pool being scaled while requests flow."""
from __future__ import annotations

import random
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402

from tandem.workers.decode_worker import DecodeWorker  # noqa: E402
from tandem.engine.llm import LLM  # noqa: E402
from tandem.workers.prefill_worker import PrefillWorker  # noqa: E402
from tandem.protocol.sampling_params import SamplingParams  # noqa: E402
from tandem.protocol.worker import WorkerRequest  # noqa: E402
from tests.ray_actors import actor_state, alive  # noqa: E402
from tests.ray_start import start_ray  # noqa: E402

APP = "disagg"
MAX_TOKENS = 8
THRESHOLD = 32  # uncached prompt tokens from which the prefill pool is used
ENGINE = {"num_kv_blocks": 1024, "block_size": 16, "max_num_batched_tokens": 256}
TRANSFER = {"timeout_s": 5.0, "connect_timeout_s": 5.0, "heartbeat_s": 0.2, "peer_timeout_s": 2.0,
            "min_message_bytes": 0}
DISAGG = {"remote_prefill_min_tokens": THRESHOLD, "prefill_timeout_s": 20.0, "kv_wait_timeout_s": 5.0}


def deploy(model: str, num_decode_replicas: int):
    prefill = serve.deployment(PrefillWorker, name="PrefillWorker").options(
        num_replicas=1, max_ongoing_requests=64, health_check_period_s=1,
        ray_actor_options={"num_cpus": 0, "resources": {"prefill": 1}},
        request_router_config=RequestRouterConfig(
            request_router_class="tandem.router.request_router.TandemRequestRouter",
            request_router_kwargs={"policy": "prefix_aware", "block_size": ENGINE["block_size"]}),
    ).bind(model, ENGINE, "cpu", TRANSFER)
    decode = serve.deployment(DecodeWorker, name="DecodeWorker").options(
        num_replicas=num_decode_replicas, max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0, "resources": {"decode": 1}},
    ).bind(model, prefill, ENGINE, "cpu", DISAGG, TRANSFER)
    return serve.run(decode, name=APP, route_prefix=None)


@pytest.fixture(scope="module")
def cluster(llama_dir):
    def start():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        nodes = (cluster.add_node(num_cpus=1, resources={"prefill": 2}),
                 cluster.add_node(num_cpus=1, resources={"decode": 2}))
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        return cluster, nodes

    ray_cluster, (prefill_node, decode_node) = start_ray(start)
    serve.start(proxy_location="Disabled")
    try:
        handle = deploy(llama_dir, 1)
        yield {"handle": handle, "model": llama_dir, "prefill_node": prefill_node.node_id,
               "decode_node": decode_node.node_id}
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Colocated engine, same weights: the greedy tokens every mode must reproduce."""
    llm = LLM(llama_dir, num_kv_blocks=2048)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [o.outputs[0].token_ids for o in outs]

    return run


def make_prompts(seed: int, count: int, vocab: int = 600) -> list[list[int]]:
    """A mix: long prompts sharing a system prefix, long unique ones, short ones."""
    rng = random.Random(seed)
    system = [rng.randrange(5, vocab) for _ in range(48)]
    prompts = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            prompts.append(system + [rng.randrange(5, vocab) for _ in range(rng.randrange(20, 120))])
        elif kind == 1:
            prompts.append([rng.randrange(5, vocab) for _ in range(rng.randrange(60, 200))])
        else:
            prompts.append([rng.randrange(5, vocab) for _ in range(rng.randrange(3, THRESHOLD - 4))])
    return prompts


def start(handle, rid: str, prompt: list[int], max_tokens: int = MAX_TOKENS):
    request = WorkerRequest(rid, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return handle.options(stream=True).generate.remote(request)


def collect(stream) -> list[int]:
    tokens: list[int] = []
    finished = False
    for delta in stream:
        assert delta.error is None, delta.error
        tokens += delta.outputs[0].token_ids
        finished = delta.finished
    assert finished
    return tokens


def run_batch(handle, prompts: list[list[int]], tag: str) -> list[list[int]]:
    streams = [start(handle, f"{tag}-{i}", p) for i, p in enumerate(prompts)]
    return [collect(s) for s in streams]


def replica_actors(deployment: str) -> list:
    return alive(f"ServeReplica:{APP}:{deployment}")


def decode_stats(handle):
    return handle.stats.remote().result(timeout_s=30)


def prefill_stats():
    return serve.get_deployment_handle("PrefillWorker", APP).stats.remote().result(timeout_s=30)


@pytest.mark.timeout(240)
def test_disaggregated_output_equals_colocated_and_kv_crossed(cluster, reference):
    handle = cluster["handle"]
    # The pools live on their own nodes.
    assert [a.node_id for a in replica_actors("PrefillWorker")] == [cluster["prefill_node"]]
    assert [a.node_id for a in replica_actors("DecodeWorker")] == [cluster["decode_node"]]

    prompts = make_prompts(seed=1, count=12)
    # Warm the prefix caches with one request sharing the system prompt, so later ones carry a
    # decode-side prefix hit (only the uncached suffix crosses) and a prefill-side hit.
    assert collect(start(handle, "warm", prompts[0])) == reference([prompts[0]])[0]
    got = run_batch(handle, prompts, "mixed")
    assert got == reference(prompts)

    long_unique = prompts[1::3]  # 60+ tokens, nothing cached anywhere: must go over
    long_all = [prompts[0]] + [p for p in prompts if len(p) >= THRESHOLD]
    stats = decode_stats(handle)
    assert len(long_unique) <= stats.disagg.remote_prefills_ok <= len(long_all), stats.disagg
    assert stats.disagg.remote_prefills_failed == 0, stats.disagg.last_failure
    assert stats.transfer.transfers_ok == stats.disagg.remote_prefills_ok
    assert stats.transfer.bytes_received > 0
    assert stats.engine.prefix_cache_hits > 0  # shared system prompt hit on the decode side
    sent = prefill_stats()
    assert sent.transfer.bytes_sent == stats.transfer.bytes_received
    assert sent.exports_ok == stats.disagg.remote_prefills_ok
    assert sent.engine.prefix_cache_hits > 0  # ... and on the prefill side
    # Short prompts were prefilled on the decode worker only.
    assert sent.engine.prompt_tokens_total <= sum(len(p) for p in long_all)
    assert stats.engine.prompt_tokens_total == sum(len(p) for p in [prompts[0]] + prompts)
    # Everything finished: no blocks held anywhere, nothing waiting for KV.
    assert stats.num_waiting_for_kv == 0 and stats.engine.num_running == 0
    assert stats.engine.kv_usage == 0.0 and sent.engine.kv_usage == 0.0

    # The Ray metrics each replica exported (its publish loop ticks every 50 ms) say the same.
    decode_metrics = settled_metrics(
        lambda: handle.metric_samples.remote().result(timeout_s=30),
        lambda m: m.get("tandem_kv_transfer_bytes_total{direction=received}") == stats.transfer.bytes_received)
    prefill_handle = serve.get_deployment_handle("PrefillWorker", APP)
    prefill_metrics = settled_metrics(
        lambda: prefill_handle.metric_samples.remote().result(timeout_s=30),
        lambda m: m.get("tandem_kv_transfer_bytes_total{direction=sent}") == sent.transfer.bytes_sent)
    ok = stats.disagg.remote_prefills_ok
    assert decode_metrics["tandem_kv_transfers_total{direction=received}"] == stats.transfer.transfers_ok == ok
    assert decode_metrics["tandem_remote_prefills_total{outcome=ok}"] == ok
    assert decode_metrics["tandem_remote_prefill_tokens_total"] == stats.disagg.remote_prefill_tokens > 0
    assert decode_metrics["tandem_kv_transfer_seconds_total{direction=received}"] > 0
    assert "tandem_kv_transfer_failures_total{direction=received}" not in decode_metrics  # none failed
    assert decode_metrics["vllm_prompt_tokens_total"] == stats.engine.prompt_tokens_total
    assert decode_metrics["vllm_prefix_cache_hits_total"] == stats.engine.prefix_cache_hits
    assert decode_metrics["vllm_num_requests_running"] == 0.0 == decode_metrics["tandem_num_requests_remote_prefilling"]
    assert prefill_metrics["tandem_kv_transfers_total{direction=sent}"] == sent.transfer.transfers_ok
    assert prefill_metrics["vllm_prefix_cache_hits_total"] == sent.engine.prefix_cache_hits
    # Serve's custom-autoscaling hook, idle now
    idle = {"queued_prefill_tokens": 0.0, "num_running": 0.0, "num_waiting": 0.0, "kv_usage": 0.0}
    assert handle.record_autoscaling_stats.remote().result(timeout_s=30) == idle
    assert prefill_handle.record_autoscaling_stats.remote().result(timeout_s=30) == idle


def settled_metrics(read, predicate, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = read()
        if predicate(samples):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_build_app_disaggregated_pools_serve_identical_tokens(cluster, reference):
    """`workers.app`'s disaggregated wiring (what `tandem serve --mode disaggregated` deploys):
    its decode pool, fed by its own prefill pool pinned by custom resources, gives the
    colocated engine's tokens and really pulls KV from its prefill pool."""
    from tandem.workers.app import AppArgs, _decode_pool

    args = AppArgs.from_dict({
        "model": cluster["model"], "mode": "disaggregated", "pool_resources": True, "worker_num_cpus": 0,
        "engine_kwargs": ENGINE, "disagg": DISAGG, "transfer": TRANSFER,
    })
    handle = serve.run(_decode_pool(args, cluster["model"]), name="app-disagg", route_prefix=None)
    try:
        prompts = make_prompts(seed=11, count=6)
        streams = [start(handle, f"app-{i}", p) for i, p in enumerate(prompts)]
        assert [collect(s) for s in streams] == reference(prompts)
        stats = decode_stats(handle)
        assert stats.disagg.remote_prefills_ok >= 1 and stats.transfer.bytes_received > 0
    finally:
        serve.delete("app-disagg")


def test_cancelled_request_frees_its_blocks(cluster):
    handle = cluster["handle"]
    prompt = make_prompts(seed=5, count=2)[1]
    stream = start(handle, "cancel-me", prompt, max_tokens=500)
    next(iter(stream))  # it is decoding
    assert decode_stats(handle).engine.kv_usage > 0
    stream.cancel()
    deadline = time.monotonic() + 20
    while True:
        stats = decode_stats(handle)
        if stats.engine.num_running == 0 and stats.engine.kv_usage == 0.0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert prefill_stats().engine.kv_usage == 0.0


@pytest.mark.timeout(240)
def test_killing_the_prefill_replica_mid_run_completes_every_request(cluster, reference):
    handle = cluster["handle"]
    before_stats = decode_stats(handle)
    before = before_stats.disagg
    [victim] = replica_actors("PrefillWorker")
    victim_id = victim.actor_id
    victim = ray.get_actor(victim.name, namespace="serve")
    # Long prompts keep the prefill worker busy for a while, so the kill lands mid-prefill.
    rng = random.Random(2)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(1500, 1900))] for _ in range(10)]
    streams = [start(handle, f"kill-{i}", p) for i, p in enumerate(prompts)]
    deadline = time.monotonic() + 30
    while decode_stats(handle).disagg.remote_prefills_started - before.remote_prefills_started < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ray.kill(victim, no_restart=True)
    got = [collect(s) for s in streams]
    assert got == reference(prompts)
    assert actor_state(victim_id) == "DEAD"  # the kill really happened mid-run
    # In-flight prefills either fell back to local prefill or were retried by Serve on the
    # replacement replica; which one depends on timing. Both complete every request.
    after = decode_stats(handle).disagg
    assert after.remote_prefills_started > before.remote_prefills_started
    assert after.remote_prefills_failed == 0 or after.last_failure, after

    # Serve replaces the replica; the new one pairs with the decode worker on demand.
    deadline = time.monotonic() + 60
    while True:
        ok_before = decode_stats(handle).disagg.remote_prefills_ok
        prompt = make_prompts(seed=3, count=2)[1]
        assert collect(start(handle, f"after-kill-{time.monotonic()}", prompt)) == reference([prompt])[0]
        stats = decode_stats(handle)
        if stats.disagg.remote_prefills_ok > ok_before:
            break
        assert time.monotonic() < deadline, stats.disagg
        time.sleep(0.5)
    assert stats.transfer.pairs_created > before_stats.transfer.pairs_created


@pytest.mark.timeout(240)
def test_scaling_the_decode_pool_while_requests_flow_loses_none(cluster, reference):
    handle = cluster["handle"]
    prompts = make_prompts(seed=4, count=30)
    expected = reference(prompts)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(indices: list[int]) -> None:
        for i in indices:
            try:
                results[i] = collect(start(handle, f"scale-{i}", prompts[i]))
            except BaseException as error:  # reported below
                errors.append(error)

    clients = [threading.Thread(target=client, args=(list(range(k, len(prompts), 3)),)) for k in range(3)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    deploy(cluster["model"], 2)  # in place: the running replica keeps serving
    for t in clients:
        t.join(timeout=180)
    assert not errors, errors
    assert [results[i] for i in range(len(prompts))] == expected
    decoders = replica_actors("DecodeWorker")
    assert len(decoders) == 2 and {a.node_id for a in decoders} == {cluster["decode_node"]}
    # The new replica serves too, with its own remote prefills.
    served = {}
    for i, prompt in enumerate(make_prompts(seed=6, count=12)):
        stream = start(handle, f"after-scale-{i}", prompt)
        replica = None
        for delta in stream:
            replica = delta.replica_id
        served[replica] = served.get(replica, 0) + 1
    assert len(served) == 2, served
