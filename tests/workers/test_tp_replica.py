"""Tensor parallelism in the Serve pools (`workers/tp_replica.py`), on a real local Ray + Serve on
the CPU: a colocated app whose replica is a tensor-parallel group of 2 ranks (rank 0 the Serve
replica, rank 1 a Ray actor in the replica's placement group, gloo between them) gives greedy
tokens identical to a plain (TP=1) app and to the offline engine, for concurrent requests; a
rank killed mid-stream ends the group, which Serve replaces, and the ingress continues its
streams. Also the build-time checks, the deployment's bundles, the `--tensor-parallel` flag and
`tandem status`'s degree."""
from __future__ import annotations

import argparse
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
from ray import serve

from tandem.cluster import serve_cli
from tandem.cluster.status_cli import format_report
from tandem.engine.llm import LLM
from tandem.engine.make_model import make_model
from tandem.protocol.sampling_params import SamplingParams
from tandem.workers.app import AppArgs, _decode_pool, build_app
from tandem.workers.rank_group import RANK_NAMESPACE
from tests.router.serve_harness import greedy_tokens, local_serve

DISAGG_DEGREES = [(2, 1), (1, 2), (2, 2)]  # (prefill, decode) tensor-parallel degrees
ENGINE = {"num_kv_blocks": 128, "block_size": 16, "max_model_len": 512, "max_num_batched_tokens": 64}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("tp-serve") / "llama", "llama", seed=1))


# ---------------------------------------------------------------------------- build time
def test_bad_degrees_fail_at_build_time(model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size: num_attention_heads .4. is not divisible"):
        build_app({"model": model_dir, "tensor_parallel_size": 3})
    with pytest.raises(ValueError, match="tensor_parallel_size: num_attention_heads .4. is not divisible"):
        build_app({"model": model_dir, "mode": "disaggregated", "prefill_tensor_parallel_size": 3})
    with pytest.raises(ValueError, match="pool option, not a DisaggConfig field"):
        AppArgs.from_dict({"mode": "disaggregated", "disagg": {"prefill_tensor_parallel_size": 2}})
    with pytest.raises(ValueError, match="expert parallel .2. and tensor parallel .2."):
        AppArgs.from_dict({"expert_parallel_size": 2, "tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="pool option"):
        AppArgs.from_dict({"engine_kwargs": {"tensor_parallel_size": 2}})
    with pytest.raises(ValueError, match="integer >= 1"):
        AppArgs.from_dict({"tensor_parallel_size": 0})


def test_a_replica_asks_for_one_bundle_per_rank(model_dir):
    from tandem.workers.tp_replica import TensorParallelLLMWorker

    args = AppArgs.from_dict({"model": model_dir, "tensor_parallel_size": 4, "worker_num_cpus": 2,
                              "worker_num_gpus": 1, "device": "cuda"})
    pool = _decode_pool(args, model_dir)._bound_deployment
    assert pool.func_or_class is TensorParallelLLMWorker and pool.name == "LLMWorker"
    assert pool._replica_config.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert pool._replica_config.placement_group_strategy == "STRICT_PACK"
    assert pool.init_kwargs == {"tensor_parallel_size": 4, "rank_actor_options": {"num_cpus": 2, "num_gpus": 1}}


def test_tensor_parallel_flag_and_status():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    built = serve_cli.app_args(parser.parse_args(["--tensor-parallel", "colocated=2"]))
    assert AppArgs.from_dict(built).tensor_parallel_size == 2
    built = serve_cli.app_args(parser.parse_args(["--prefill", "1", "--decode", "1", "--tensor-parallel", "prefill=2",
                                                  "--tensor-parallel", "decode=1"]))
    assert (built["prefill_tensor_parallel_size"], built["tensor_parallel_size"]) == (2, 1)
    with pytest.raises(ValueError, match="needs a prefill pool"):
        serve_cli.app_args(parser.parse_args(["--tensor-parallel", "prefill=2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--tensor-parallel", "decode=0"])
    report = {"app": "tandem", "status": "RUNNING", "args": {"tensor_parallel_size": 2}, "deployments": {
        "LLMWorker": {"status": "HEALTHY", "replicas": {"RUNNING": 1}},
        "OpenAIIngress": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}}}
    lines = format_report(report).splitlines()
    assert "(tp=2 per replica)" in next(line for line in lines if "LLMWorker" in line)
    assert "per replica" not in next(line for line in lines if "OpenAIIngress" in line)


# ---------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def served(model_dir):
    """"tp1": a plain engine pool; "tp2": the whole app (OpenAI ingress in front) over one TP=2
    replica."""
    common = {"model": model_dir, "worker_num_cpus": 0.5, "engine_kwargs": ENGINE, "health_check_period_s": 1}
    tp2 = build_app({**common, "served_model_name": "tiny", "ingress_num_cpus": 0, "tensor_parallel_size": 2})
    # Disaggregated, prefill TP=p -> decode TP=d: every prompt of 8+ uncached tokens is
    # prefilled remotely, each prefill rank sending its KV heads to the decode ranks holding them.
    disagg = [serve.RunTarget(_decode_pool(AppArgs.from_dict({
        **common, "worker_num_cpus": 0.2,  # every bundle of the 5 apps fits the local cluster's 4 CPUs
        "mode": "disaggregated", "prefill_tensor_parallel_size": p, "tensor_parallel_size": d,
        "disagg": {"remote_prefill_min_tokens": 8}}), model_dir), f"tpd{p}{d}", None) for p, d in DISAGG_DEGREES]
    with local_serve() as url:
        serve.run_many([serve.RunTarget(_decode_pool(AppArgs.from_dict(common), model_dir), "tp1", None),
                        serve.RunTarget(tp2, "tp2", "/"), *disagg])
        yield {"url": url}


def _generate(app: str, rid: str, prompt: list[int], deployment: str = "LLMWorker") -> list[int]:
    return greedy_tokens(app, deployment, rid, prompt, MAX_TOKENS)


@pytest.mark.timeout(300)
def test_tp2_replica_gives_the_tokens_of_tp1(served, model_dir):
    rng = random.Random(3)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(2, 150))] for _ in range(8)]
    llm = LLM(model_dir, dtype="float32", **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offline = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for round_ in range(2):  # the second round starts from paused ranks
        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: batched together
            tp2 = list(pool.map(lambda ip: _generate("tp2", f"tp2-{round_}-{ip[0]}", ip[1]), enumerate(prompts)))
        tp1 = [_generate("tp1", f"tp1-{round_}-{i}", p) for i, p in enumerate(prompts)]
        assert tp2 == tp1 == offline
    handle = serve.get_deployment_handle("LLMWorker", "tp2")
    assert handle.tensor_parallel_size.remote().result(timeout_s=30) == 2
    (name,) = handle.rank_actor_names.remote().result(timeout_s=30)
    ray.get(ray.get_actor(name, namespace=RANK_NAMESPACE).check_health.remote(), timeout=30)


def _rank_transfer_metrics(app: str, deployment: str) -> list:
    handle = serve.get_deployment_handle(deployment, app)
    ranks = [ray.get_actor(name, namespace=RANK_NAMESPACE) for name in handle.rank_actor_names.remote().result(timeout_s=30)]
    return ray.get([rank.kv_metrics.remote() for rank in ranks], timeout=30)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefill_tp, decode_tp", DISAGG_DEGREES)
def test_disaggregated_tp_gives_the_tokens_of_colocated_tp1(served, model_dir, prefill_tp, decode_tp):
    """Prefill TP=p -> decode TP=d gives the tokens of colocated TP=1; the KV crossed (every
    prompt was prefilled remotely, none recomputed), in one message per rank pair per request
    (one layer group: all layers fit in one message; 2 KV heads: 2 rank pairs in each case)."""
    app = f"tpd{prefill_tp}{decode_tp}"
    rng = random.Random(4)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(20, 150))] for _ in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        disagg = list(pool.map(lambda ip: _generate(app, f"{app}-{ip[0]}", ip[1], "DecodeWorker"), enumerate(prompts)))
    tp1 = [_generate("tp1", f"tp1-{app}-{i}", p) for i, p in enumerate(prompts)]
    assert disagg == tp1
    decode = serve.get_deployment_handle("DecodeWorker", app)
    stats = decode.stats.remote().result(timeout_s=30)
    assert stats.disagg.remote_prefills_ok == len(prompts) and stats.disagg.remote_prefills_failed == 0
    received = [stats.transfer] + (_rank_transfer_metrics(app, "DecodeWorker") if decode_tp > 1 else [])
    assert sum(m.messages_received for m in received) == 2 * len(prompts)
    assert all(m.transfers_ok == len(prompts) for m in received)  # every decode rank got its heads
    prefill = serve.get_deployment_handle("PrefillWorker", app)
    stats = prefill.stats.remote().result(timeout_s=30)
    assert stats.exports_ok == len(prompts) and stats.exports_failed == 0
    sent = [stats.transfer] + (_rank_transfer_metrics(app, "PrefillWorker") if prefill_tp > 1 else [])
    assert sum(m.messages_sent for m in sent) == 2 * len(prompts)
    if decode_tp > 1:
        assert decode.tensor_parallel_size.remote().result(timeout_s=30) == decode_tp


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_stream_ends_the_group_and_its_streams_continue(served, model_dir):
    """Last in the module: rank 1's process is SIGKILLed while the group streams through the
    OpenAI endpoint. The group cannot step without it, so the replica ends itself, Serve starts
    a new group, and the ingress continues every stream there: each gives the offline engine's
    text. The new group then serves the tokens of TP=1."""
    handle = serve.get_deployment_handle("LLMWorker", "tp2")
    (name,) = handle.rank_actor_names.remote().result(timeout_s=30)
    rank = ray.get_actor(name, namespace=RANK_NAMESPACE)
    rank_pid = ray.get(rank.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 600) for _ in range(rng.randrange(8, 100))] for _ in range(4)]
    max_tokens = 64
    llm = LLM(model_dir, dtype="float32", **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    offline = [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=200)

    def stream(prompt: list[int]) -> str:
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    before = handle.stats.remote().result(timeout_s=30).engine.generation_tokens_total
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        deadline = time.monotonic() + 60
        while not ((e := handle.stats.remote().result(timeout_s=30).engine).num_running >= 2
                   and e.generation_tokens_total > before + 8):
            assert time.monotonic() < deadline, "streams on the group"
            time.sleep(0.05)
        os.kill(rank_pid, signal.SIGKILL)
        texts = [f.result(timeout=240) for f in futures]
    assert texts == offline
    assert handle.rank_actor_names.remote().result(timeout_s=30) != [name]  # a new group
    prompt = [7, 8, 9, 10, 11]
    assert _generate("tp2", "after-rank-death", prompt) == _generate("tp1", "after-rank-death", prompt)
