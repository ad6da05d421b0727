"""Expert parallelism in the Serve pools (`workers/ep_replica.py`), on a real local Ray + Serve
with the tiny random Qwen3-MoE (8 experts).

Two disaggregated apps, each pool with its own degree: "ep" (decode pool 2 ranks per replica,
prefill pool 1; through the OpenAI HTTP endpoint) and "ep-reverse" (prefill pool 2 ranks, decode
pool 1; through the app handle). Concurrent requests are spread over the ranks, long prompts
are prefilled by the prefill pool and their KV lands on whichever rank serves them, and every
greedy token (and its logprob) equals the offline single-process engine's. Also: a shared
prefix goes to the rank that cached it and the pool's prefix index sees it under the replica,
cancelling frees the ranks' blocks, and killing a rank actor fails the replica's health check
(Serve then replaces the whole group). The merging and the rank choice are tested alone first.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
from ray import serve

from tandem.workers.app import AppArgs, _decode_pool, build_app
from tandem.router.index_actor import INDEX_NAMESPACE, index_actor_name
from tests.router.serve_harness import local_serve
from tandem.protocol.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, Tier
from tandem.workers.ep_replica import RANK_NAMESPACE, RankCaches, choose_rank, merge_stats
from tandem.engine.llm import LLM
from tandem.protocol.worker import EngineStats
from tandem.engine.make_model import make_model
from tandem.protocol.prefix_hash import hash_full_blocks
from tandem.protocol.sampling_params import SamplingParams
from tandem.protocol.worker import WorkerRequest

BLOCK_SIZE = 16
MAX_TOKENS = 6
THRESHOLD = 32  # uncached prompt tokens from which the decode worker asks the prefill pool
ENGINE = {"num_kv_blocks": 192, "block_size": BLOCK_SIZE, "max_model_len": 512, "max_num_batched_tokens": 256}
TRANSFER = {"timeout_s": 5.0, "connect_timeout_s": 5.0, "heartbeat_s": 0.2, "peer_timeout_s": 2.0,
            "min_message_bytes": 0}
DISAGG = {"remote_prefill_min_tokens": THRESHOLD, "prefill_timeout_s": 20.0, "kv_wait_timeout_s": 5.0}
LOGPROB_TOL = 1e-3  # EP sums expert outputs in another order than one process does


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny random Qwen3-MoE: 8 experts, top-2."""
    return str(make_model(tmp_path_factory.mktemp("ep-serve") / "qwen3_moe", "qwen3_moe", seed=1))


# ---------------------------------------------------------------------------- the parts alone
def stored(*hashes: int, parent: int | None = None) -> BlocksStored:
    return BlocksStored(list(hashes), parent)


def test_rank_caches_report_a_block_until_no_rank_holds_it():
    caches = RankCaches(2)
    assert caches.apply(0, [stored(1, 2, 3)]) == [stored(1, 2, 3)]
    assert caches.apply(1, [stored(1, 2), stored(4, parent=2)]) == [stored(1, 2), stored(4, parent=2)]
    assert caches.cached_blocks([1, 2, 3]) == [3, 2]
    assert caches.cached_blocks([1, 2, 4]) == [2, 3]
    # Rank 1 drops 1, 2 and 4: only 4 leaves the replica (rank 0 still holds 1 and 2).
    assert caches.apply(1, [BlocksRemoved([1, 2, 4, 99])]) == [BlocksRemoved([4])]
    # Rank 0's cache is reset: everything it held leaves the replica.
    assert caches.apply(0, [AllBlocksCleared()]) == [BlocksRemoved([1, 2, 3])]
    assert caches.cached_blocks([1, 2, 3]) == [0, 0]
    assert caches.apply(0, [BlocksRemoved([1])]) == []


def test_rank_caches_keep_the_tiers_apart():
    caches = RankCaches(2)
    host = BlocksStored([1, 2], None, Tier.HOST)
    assert caches.apply(0, [host]) == [host]
    assert caches.apply(1, [stored(1, 2)]) == [stored(1, 2)]
    assert caches.cached_blocks([1, 2]) == [0, 2]  # the device tier only
    # Rank 0's host tier drops block 2: rank 1's device copy is another tier, so it leaves.
    assert caches.apply(0, [BlocksRemoved([2], Tier.HOST)]) == [BlocksRemoved([2], Tier.HOST)]
    assert caches.apply(1, [AllBlocksCleared()]) == [BlocksRemoved([1, 2])]
    assert caches.apply(0, [AllBlocksCleared()]) == [BlocksRemoved([1], Tier.HOST)]


def test_choose_rank_prefers_the_cached_prefix_within_the_imbalance_limit():
    assert choose_rank([0, 0], [0, 0], first=1) == 1  # idle group: ties rotate
    assert choose_rank([0, 0], [3, 1]) == 1  # least busy
    assert choose_rank([2, 5], [0, 4], imbalance_limit=4) == 1  # longest prefix, 4 more in flight is fine
    assert choose_rank([2, 5], [0, 5], imbalance_limit=4) == 0  # too busy: least busy wins
    assert choose_rank([0, 0, 3], [1, 0, 1]) == 2


def test_merge_stats_sums_ranks_and_recomputes_kv_usage():
    def engine(free: int, prompt_tokens: int) -> EngineStats:
        return EngineStats(1, 0, 10, 0, free, 100, 1 - free / 100, 5, 2, 0, prompt_tokens, 3)

    merged = merge_stats([engine(90, 7), engine(50, 4)])
    assert (merged.num_running, merged.num_free_blocks, merged.num_total_blocks) == (2, 140, 200)
    assert merged.prompt_tokens_total == 11 and merged.kv_usage == pytest.approx(0.3)
    tiered = [dataclasses.replace(engine(90, 7), host_kv_total_blocks=100, host_kv_used_blocks=used,
                                  host_kv_usage=used / 100) for used in (10, 30)]
    assert merge_stats(tiered).host_kv_usage == pytest.approx(0.2)


def test_bad_degrees_fail_at_build_time(tmp_path, model_dir):
    moe = model_dir
    dense = str(make_model(tmp_path / "dense", "llama", seed=1))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        build_app({"model": dense, "expert_parallel_size": 2, "worker_num_cpus": 1})
    with pytest.raises(ValueError, match="larger than the model's 8 experts"):
        build_app({"model": moe, "mode": "disaggregated", "prefill_expert_parallel_size": 9, "worker_num_cpus": 1})
    with pytest.raises(ValueError, match="non-zero resource"):
        build_app({"model": moe, "expert_parallel_size": 2, "worker_num_cpus": 0})
    with pytest.raises(ValueError, match="one whole GPU per rank"):
        build_app({"model": moe, "expert_parallel_size": 2, "device": "cuda", "worker_num_gpus": 0.5})
    with pytest.raises(ValueError, match="pool option"):
        AppArgs.from_dict({"engine_kwargs": {"expert_parallel_size": 2}})
    with pytest.raises(ValueError, match="needs mode 'disaggregated'"):
        AppArgs.from_dict({"prefill_expert_parallel_size": 2})
    with pytest.raises(ValueError, match="integer >= 1"):
        AppArgs.from_dict({"expert_parallel_size": 0})
    build_app({"model": moe, "mode": "disaggregated", "expert_parallel_size": 8, "worker_num_cpus": 1})


def test_each_pool_gets_its_own_degree_and_one_bundle_per_rank(model_dir):
    from tandem.workers.ep_replica import ExpertParallelDecodeWorker
    from tandem.workers.prefill_worker import PrefillWorker

    moe = model_dir
    args = AppArgs.from_dict({"model": moe, "mode": "disaggregated", "expert_parallel_size": 4, "worker_num_cpus": 2,
                              "worker_num_gpus": 1, "pool_resources": True})
    decode = _decode_pool(args, moe)._bound_deployment  # Serve's Deployment: what Serve is asked for
    rank = {"num_cpus": 2, "num_gpus": 1, "resources": {"decode": 1}}
    assert decode.func_or_class is ExpertParallelDecodeWorker and decode.name == "DecodeWorker"
    assert decode._replica_config.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0, "decode": 1.0}] * 4
    assert decode._replica_config.placement_group_strategy == "STRICT_PACK"
    assert decode.init_kwargs == {"expert_parallel_size": 4, "rank_actor_options": rank}
    prefill = decode.init_args[1]._bound_deployment
    assert prefill.func_or_class is PrefillWorker and prefill.init_kwargs == {}
    assert prefill._replica_config.placement_group_bundles is None  # its own degree: 1


def test_serve_cli_expert_parallel_flags():
    import argparse

    from tandem.cluster import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    flags = parser.parse_args(["--prefill", "1", "--decode", "2", "--expert-parallel", "decode=4",
                               "--expert-parallel", "prefill=2"])
    parsed = AppArgs.from_dict(serve_cli.app_args(flags))
    assert (parsed.expert_parallel_size, parsed.prefill_expert_parallel_size) == (4, 2)
    parsed = AppArgs.from_dict(serve_cli.app_args(parser.parse_args(["--expert-parallel", "colocated=2"])))
    assert parsed.expert_parallel_size == 2
    with pytest.raises(ValueError):
        serve_cli.app_args(parser.parse_args(["--expert-parallel", "prefill=2"]))  # colocated app
    with pytest.raises(SystemExit):
        parser.parse_args(["--expert-parallel", "decode=0"])


# ----------------------------------------------------------------------------- the Serve apps
@pytest.fixture(scope="module")
def served(model_dir):
    common = {"model": model_dir, "mode": "disaggregated", "worker_num_cpus": 0.5, "engine_kwargs": ENGINE,
              "disagg": DISAGG, "transfer": TRANSFER}
    app = build_app({**common, "served_model_name": "tiny-moe", "ingress_num_cpus": 0, "health_check_period_s": 1,
                     "expert_parallel_size": 2, "prefill_expert_parallel_size": 1})
    reverse = AppArgs.from_dict({**common, "expert_parallel_size": 1, "prefill_expert_parallel_size": 2})
    with local_serve() as url:
        # Both apps start together (their replicas load side by side).
        serve.run_many([serve.RunTarget(app, "ep", "/"),
                        serve.RunTarget(_decode_pool(reverse, model_dir), "ep-reverse", None)])
        yield {"url": url}


@pytest.fixture(scope="module")
def reference(model_dir):
    """The offline single-process engine: (tokens, text, chosen-token logprobs) per prompt."""
    llm = LLM(model_dir, num_kv_blocks=512, max_model_len=512)

    def run(prompts: list[list[int]], max_tokens: int = MAX_TOKENS):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
        outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        return [(o.token_ids, o.text, [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]) for o in outs]

    return run


def make_prompts(seed: int, count: int, vocab: int = 600) -> list[list[int]]:
    """Mostly long prompts (prefilled by the prefill pool), every fourth one short (locally)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(3, THRESHOLD - 4) if i % 4 == 3
                                                      else rng.randrange(THRESHOLD + 8, 120))]
            for i in range(count)]


def handle_of(app: str, deployment: str):
    return serve.get_deployment_handle(deployment, app)


def start(handle, rid: str, prompt: list[int], max_tokens: int = MAX_TOKENS):
    request = WorkerRequest(rid, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    return handle.options(stream=True).generate.remote(request)


def collect(stream):
    tokens, logprobs, cached = [], [], 0
    finished = False
    for delta in stream:
        assert delta.error is None, delta.error
        tokens += delta.outputs[0].token_ids
        logprobs += [lp.logprob for lp in delta.outputs[0].logprobs or []]
        cached, finished = delta.num_cached_tokens, delta.finished
    assert finished
    return tokens, logprobs, cached


def assert_same(got_logprobs: list[float], want_logprobs: list[float]) -> None:
    assert len(got_logprobs) == len(want_logprobs)
    assert max(abs(a - b) for a, b in zip(got_logprobs, want_logprobs)) < LOGPROB_TOL


@pytest.mark.timeout(300)
def test_decode_pool_of_two_ranks_over_http_equals_the_offline_engine(served, reference):
    prompts = make_prompts(seed=1, count=8)
    expected = reference(prompts)
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)

    def complete(prompt: list[int]):
        reply = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=1, extra_body={"ignore_eos": True})
        return reply.choices[0].text, reply.choices[0].logprobs.token_logprobs

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(complete, prompts))
    for (text, logprobs), (_, want_text, want_logprobs) in zip(got, expected):
        assert text == want_text
        assert_same(logprobs, want_logprobs)

    decode = handle_of("ep", "DecodeWorker")
    served_per_rank = decode.requests_per_rank.remote().result(timeout_s=30)
    assert len(served_per_rank) == 2 and min(served_per_rank) >= 2, served_per_rank  # both ranks worked
    ranks = decode.rank_stats.remote().result(timeout_s=30)
    assert all(r.engine.prompt_tokens_total > 0 for r in ranks), ranks
    assert all(r.disagg.remote_prefills_ok > 0 and r.transfer.bytes_received > 0 for r in ranks), \
        [r.disagg for r in ranks]  # KV from the prefill pool landed on each rank
    group = decode.stats.remote().result(timeout_s=30)
    assert group.engine.prompt_tokens_total == sum(r.engine.prompt_tokens_total for r in ranks)
    assert group.disagg.remote_prefills_ok == sum(r.disagg.remote_prefills_ok for r in ranks)
    assert group.disagg.remote_prefills_failed == 0, group.disagg.last_failure
    prefill = handle_of("ep", "PrefillWorker").stats.remote().result(timeout_s=30)
    assert prefill.exports_ok == group.disagg.remote_prefills_ok
    # The replica's engine metrics are the group's (the expert load too). The expert load is read
    # once per `expert_load_interval_s` (1 s), the engine counters every publish: wait for both.
    def expert_tokens(samples: dict) -> bool:
        return any(key.startswith("tandem_moe_expert_tokens_total") and value > 0 for key, value in samples.items())

    deadline = time.monotonic() + 10
    while (samples := decode.metric_samples.remote().result(timeout_s=30)).get("vllm_prompt_tokens_total") != \
            group.engine.prompt_tokens_total or not expert_tokens(samples):
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_prefill_pool_of_two_ranks_equals_the_offline_engine(served, reference):
    prompts = make_prompts(seed=2, count=8)
    expected = reference(prompts)
    decode = handle_of("ep-reverse", "DecodeWorker")
    streams = [start(decode, f"reverse-{i}", p) for i, p in enumerate(prompts)]
    for stream, (want_tokens, _, want_logprobs) in zip(streams, expected):
        tokens, logprobs, _ = collect(stream)
        assert tokens == want_tokens
        assert_same(logprobs, want_logprobs)
    prefill = handle_of("ep-reverse", "PrefillWorker")
    assert min(prefill.requests_per_rank.remote().result(timeout_s=30)) >= 1
    ranks = prefill.rank_stats.remote().result(timeout_s=30)
    assert all(r.exports_ok > 0 and r.transfer.bytes_sent > 0 for r in ranks), ranks
    received = decode.stats.remote().result(timeout_s=30)
    assert received.disagg.remote_prefills_failed == 0, received.disagg.last_failure
    assert received.disagg.remote_prefills_ok == sum(r.exports_ok for r in ranks)
    assert received.transfer.bytes_received == sum(r.transfer.bytes_sent for r in ranks)

    # The rank actors go with their replica.
    [rank_name] = prefill.rank_actor_names.remote().result(timeout_s=30)
    ray.get_actor(rank_name, namespace=RANK_NAMESPACE)
    serve.delete("ep-reverse")
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get_actor(rank_name, namespace=RANK_NAMESPACE)
        except ValueError:
            break
        assert time.monotonic() < deadline, "the rank actor outlived its replica"
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_a_shared_prefix_goes_to_the_rank_that_cached_it(served, reference):
    decode = handle_of("ep", "DecodeWorker")
    rng = random.Random(3)
    document = [rng.randrange(5, 600) for _ in range(5 * BLOCK_SIZE)]
    first, follow_up = document + [7, 8, 9], document + [11, 12, 13, 14]
    before = decode.requests_per_rank.remote().result(timeout_s=30)
    assert collect(start(decode, "doc-1", first))[0] == reference([first])[0][0]
    after = decode.requests_per_rank.remote().result(timeout_s=30)
    [rank] = [r for r in range(2) if after[r] > before[r]]

    # The pool's index sees the blocks under the replica (whichever rank holds them).
    index = ray.get_actor(index_actor_name("ep/DecodeWorker"), namespace=INDEX_NAMESPACE)
    hashes = hash_full_blocks(first, BLOCK_SIZE)
    deadline = time.monotonic() + 20
    while max(ray.get(index.match.remote(hashes)).values(), default=0) < len(hashes):
        assert time.monotonic() < deadline, "the index never saw the rank's blocks"
        time.sleep(0.05)
    matched = ray.get(index.match.remote(hashes))
    assert list(matched) == [decode_replica_id(decode)]

    # Sent again and again, the shared prefix stays with its rank and is served from its cache.
    for i in range(3):
        tokens, _, cached = collect(start(decode, f"doc-follow-{i}", follow_up))
        assert tokens == reference([follow_up])[0][0]
        assert cached >= len(document)
    final = decode.requests_per_rank.remote().result(timeout_s=30)
    assert final[rank] - after[rank] == 3 and final[1 - rank] == after[1 - rank], (after, final)


def decode_replica_id(decode) -> str:
    return decode.stats.remote().result(timeout_s=30).replica_id


@pytest.mark.timeout(120)
def test_cancelling_frees_the_blocks_on_every_rank(served):
    decode = handle_of("ep", "DecodeWorker")
    prompts = make_prompts(seed=4, count=2)
    streams = [start(decode, f"cancel-{i}", p, max_tokens=300) for i, p in enumerate(prompts)]
    for stream in streams:
        next(iter(stream))  # decoding now
    ranks = decode.rank_stats.remote().result(timeout_s=30)
    assert all(r.engine.num_running == 1 and r.engine.kv_usage > 0 for r in ranks), [r.engine for r in ranks]
    for stream in streams:
        stream.cancel()
    deadline = time.monotonic() + 20
    while True:
        ranks = decode.rank_stats.remote().result(timeout_s=30)
        if all(r.engine.num_running == 0 and r.engine.kv_usage == 0.0 for r in ranks):
            break
        assert time.monotonic() < deadline, [r.engine for r in ranks]
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_stream_ends_the_group_and_its_streams_continue(served, reference):
    """Last in the module: it breaks the "ep" app's decode replica on purpose. Rank 1's process
    is SIGKILLed while both ranks decode streams of the OpenAI endpoint: the group cannot step
    without it, so the replica ends itself, Serve replaces the whole group, and the ingress
    continues every stream (those of rank 0 too) on the new group, with the offline engine's
    text."""
    decode = handle_of("ep", "DecodeWorker")
    [rank_name] = decode.rank_actor_names.remote().result(timeout_s=30)
    old_replica = decode_replica_id(decode)
    rank = ray.get_actor(rank_name, namespace=RANK_NAMESPACE)
    rank_pid = ray.get(rank.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    prompts = make_prompts(seed=5, count=6)
    max_tokens = 80
    expected = reference(prompts, max_tokens=max_tokens)
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=200)

    def stream(prompt: list[int]) -> str:
        chunks = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        deadline = time.monotonic() + 60
        while not all(r.engine.num_running >= 1 and r.engine.generation_tokens_total > 0
                      for r in decode.rank_stats.remote().result(timeout_s=30)):
            assert time.monotonic() < deadline, "streams on both ranks"
            time.sleep(0.05)
        os.kill(rank_pid, signal.SIGKILL)
        texts = [f.result(timeout=240) for f in futures]
    assert texts == [want_text for _, want_text, _ in expected]

    assert decode_replica_id(decode) != old_replica  # a new group serves
    assert decode.rank_actor_names.remote().result(timeout_s=30) != [rank_name]
    prompt = make_prompts(seed=6, count=1)[0]
    assert collect(start(decode, "after-rank-death", prompt))[0] == reference([prompt])[0][0]
