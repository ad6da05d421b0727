"""Prefix routing through the whole app: the ingress tokenizes, the worker pool's
`TandemRequestRouter` ranks two real engine replicas by what their prefix caches really hold
(fed by the workers' KV events), and a second request sharing a long prefix lands on the
replica that computed it and reports the cached tokens."""
from __future__ import annotations

import time

import openai
import pytest
import ray
from ray import serve

from tandem.workers.app import AppArgs
from tandem.router.index_actor import INDEX_NAMESPACE, index_actor_name
from tandem.router.openai_ingress import REPLICA_HEADER
from tandem.cluster.apps import deploy_app, scale_app, status_report
from tests.router.serve_harness import local_serve
from tandem.engine.make_model import make_model
from tandem.protocol.prefix_hash import hash_full_blocks

BLOCK_SIZE = 16
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("routing") / "llama", "llama", seed=5))
    with local_serve() as url:
        deploy_app("prefix", {
            "model": model_dir, "served_model_name": "tiny", "num_replicas": 2, "routing_policy": "prefix_aware",
            "engine_kwargs": {"num_kv_blocks": 96, "max_model_len": 512, "block_size": BLOCK_SIZE},
            "ingress_num_cpus": 0,
        })
        yield {"url": url, "model_dir": model_dir}


def chat(client: openai.OpenAI, messages: list[dict], session: str | None):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0,
        extra_headers={"X-Session-Id": session} if session else None)
    return raw.headers[REPLICA_HEADER], raw.parse()


def prompt_block_hashes(model_dir: str, messages: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hash_full_blocks(tokenizer.encode(text, add_special_tokens=False), BLOCK_SIZE)


def test_a_shared_prefix_lands_on_the_replica_that_cached_it(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    document = " ".join(f"Fact {i}: the quick brown fox jumps over the lazy dog {i}." for i in range(14))
    system = {"role": "system", "content": f"Answer from this document. {document}"}
    first_turn = [system, {"role": "user", "content": "What is fact 3?"}]

    replica, first = chat(client, first_turn, "conversation-1")
    assert replica.startswith("prefix#LLMWorker#") or "LLMWorker" in replica
    assert first.usage.prompt_tokens > 10 * BLOCK_SIZE

    # Wait until the worker's KV events reached the pool's index (published every ~50 ms).
    index = ray.get_actor(index_actor_name("prefix/LLMWorker"), namespace=INDEX_NAMESPACE)
    hashes = prompt_block_hashes(server["model_dir"], first_turn)
    deadline = time.time() + 20
    while ray.get(index.match.remote(hashes)).get(replica, 0) < len(hashes) - 1:
        assert time.time() < deadline, "the index never saw the first request's blocks"
        time.sleep(0.05)

    follow_up = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                              {"role": "user", "content": "And fact 9?"}]
    same_replica, second = chat(client, follow_up, "conversation-1")
    assert same_replica == replica
    assert second.usage.prompt_tokens_details.cached_tokens >= 10 * BLOCK_SIZE

    # Without a session id the prefix alone decides: a new question on the same document.
    other_question = [system, {"role": "user", "content": "Which facts mention a fox?"}]
    by_prefix, third = chat(client, other_question, None)
    assert by_prefix == replica
    assert third.usage.prompt_tokens_details.cached_tokens >= 10 * BLOCK_SIZE


def test_unrelated_prompts_use_both_replicas(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    replicas = {chat(client, [{"role": "user", "content": f"Topic {k}: " + "numbers 0 1 2 3 4 5 6 7 8 9 " * 4}],
                     None)[0] for k in range(4)}
    assert len(replicas) == 2


def test_app_args_are_checked():
    with pytest.raises(ValueError, match="unknown app args"):
        AppArgs.from_dict({"modle": "x"})
    with pytest.raises(ValueError, match="routing_policy"):
        AppArgs.from_dict({"routing_policy": "fastest"})
    with pytest.raises(ValueError, match="mode"):
        AppArgs.from_dict({"mode": "split"})
    assert AppArgs.from_dict({"num_replicas": 3}).num_replicas == 3
    with pytest.raises(ValueError, match="tokenize_cache_chars"):
        AppArgs.from_dict({"tokenize_cache_chars": -1})


def test_ingress_settings_reach_the_ingress_config(tmp_path):
    from tandem.workers.app import ingress_config

    model_dir = str(make_model(tmp_path / "llama", "llama", seed=5))
    parsed = AppArgs.from_dict({"model": model_dir, "tokenize_cache_chars": 0, "max_n": 4, "api_key": "k"})
    config = ingress_config(parsed, model_dir)
    assert (config.tokenize_cache_chars, config.max_n, config.api_key) == (0, 4, "k")
    assert ingress_config(AppArgs.from_dict({"model": model_dir}), model_dir).tokenize_cache_chars == 64 << 20


def test_serve_cli_flags_become_app_args():
    import argparse

    from tandem.cluster import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    flags = parser.parse_args(["--model", "/m", "--num-replicas", "2", "--routing-policy", "round_robin",
                               "--engine-arg", "max_model_len=512", "--engine-arg", "dtype=float32"])
    parsed = AppArgs.from_dict(serve_cli.app_args(flags))
    assert (parsed.model, parsed.num_replicas, parsed.routing_policy) == ("/m", 2, "round_robin")
    assert parsed.engine_kwargs == {"max_model_len": 512, "dtype": "float32"}


def test_serve_cli_pool_flags():
    import argparse

    from tandem.cluster import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    parsed = AppArgs.from_dict(serve_cli.app_args(parser.parse_args(["--prefill", "2", "--decode", "3",
                                                                      "--pool-resources"])))
    assert (parsed.mode, parsed.prefill_replicas, parsed.num_replicas, parsed.pool_resources) == \
        ("disaggregated", 2, 3, True)
    parsed = AppArgs.from_dict(serve_cli.app_args(parser.parse_args(["--colocated", "4"])))
    assert (parsed.mode, parsed.num_replicas) == ("colocated", 4)
    for bad in (["--prefill", "1"], ["--colocated", "1", "--decode", "1", "--prefill", "1"], ["--colocated", "0"]):
        with pytest.raises(ValueError):  # `tandem serve` prints it as one line (cluster/cli.py)
            serve_cli.app_args(parser.parse_args(bad))


def test_scale_and_status_resize_a_running_pool(server):
    """`tandem scale colocated 1` / `tandem status` logic on the running app: the pool shrinks,
    the app keeps serving, and impossible requests are refused with a clear error."""
    report = status_report("prefix")
    assert report["deployments"]["LLMWorker"]["replicas"].get("RUNNING") == 2
    assert report["args"]["num_replicas"] == 2
    with pytest.raises(ValueError, match="has no decode pool"):
        scale_app("prefix", "decode", 1)  # a colocated app's pool is `colocated`
    assert scale_app("prefix", "colocated", 1)["num_replicas"] == 1
    deadline = time.monotonic() + 90
    while status_report("prefix")["deployments"]["LLMWorker"]["replicas"] != {"RUNNING": 1}:
        assert time.monotonic() < deadline, status_report("prefix")
        time.sleep(0.5)
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(ValueError, match="no prefill pool"):
        scale_app("prefix", "prefill", 2)
    with pytest.raises(LookupError):
        scale_app("nope", "decode", 2)
    with pytest.raises(ValueError, match=">= 1"):
        scale_app("prefix", "decode", 0)
