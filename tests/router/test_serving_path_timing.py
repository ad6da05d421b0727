"""The serving path's stage timing end to end, on a real local Serve app (`workers.app.build_app`)
with the real engine on a tiny random Llama: `"tandem_timing": true` puts every stage stamp, in
path order, on the first streamed token chunk (or the JSON body); without it no reply carries
the field; the tokens are the same either way and the same as the offline engine's, also for a
multi-turn history that the ingress tokenizes piecewise from its cache; `/metrics` has the
per-stage histograms."""
from __future__ import annotations

import json
import time

import pytest
import requests
from ray import serve

from tandem.workers.app import build_app
from tandem.router.stage_timing import INTERVALS, STAMPS, TOTAL
from tests.router.serve_harness import local_serve
from tandem import LLM, SamplingParams
from tandem.engine.make_model import make_model

ENGINE_KWARGS = {"num_kv_blocks": 128, "max_model_len": 1024, "max_num_seqs": 8}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world! How are you?"}]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("timing") / "llama", "llama", seed=5))
    with local_serve() as url:
        serve.run(build_app(dict(model=model_dir, served_model_name="tiny", engine_kwargs=ENGINE_KWARGS,
                                 ingress_num_cpus=0)), name="timing", route_prefix="/")
        yield {"url": url, "model_dir": model_dir}


@pytest.fixture(scope="module")
def offline(server) -> LLM:
    return LLM(server["model_dir"], **ENGINE_KWARGS)


def offline_chat(offline: LLM, messages: list[dict], max_tokens: int):
    tokenizer = offline.get_tokenizer()
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    out = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                      ignore_eos=True))[0].outputs[0]
    return ids, out.text


def stream_chat(url: str, messages: list[dict], max_tokens: int, **extra) -> list[dict]:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60) as reply:
        assert reply.status_code == 200, reply.text
        events = [line[len("data: "):] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_stamps_in_order(timing: dict) -> None:
    stamps = timing["stamps_ms"]
    # routed by TandemRequestRouter on a one-host cluster: every stamp is there
    assert list(stamps) == list(STAMPS)
    values = list(stamps.values())
    # worker stamps are placed by wall clock: allow well under a millisecond of disagreement
    assert all(b >= a - 0.5 for a, b in zip(values, values[1:])), stamps
    intervals = timing["intervals_ms"]
    assert list(intervals) == [INTERVALS[s] for s in STAMPS[1:]] + [TOTAL]
    assert sum(v for k, v in intervals.items() if k != TOTAL) == pytest.approx(intervals[TOTAL], abs=0.01)
    assert intervals[TOTAL] == pytest.approx(stamps["first_token_sent"], abs=1e-3)
    assert timing["replica_id"] and abs(timing["received_unix"] - time.time()) < 60


def test_streamed_reply_carries_the_stamps_only_when_asked(server, offline):
    ids, expected = offline_chat(offline, MESSAGES, 8)
    timed = stream_chat(server["url"], MESSAGES, 8, tandem_timing=True)
    plain = stream_chat(server["url"], MESSAGES, 8)

    def text(chunks):
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert text(timed) == text(plain) == expected
    assert timed[0]["choices"][0]["delta"]["role"] == "assistant"  # the role chunk still leads
    assert timed[-1]["usage"]["prompt_tokens"] == plain[-1]["usage"]["prompt_tokens"] == len(ids)
    assert not any("tandem_timing" in c for c in plain)
    with_timing = [i for i, c in enumerate(timed) if "tandem_timing" in c]
    first_token = next(i for i, c in enumerate(timed) if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert with_timing == [first_token]
    assert_stamps_in_order(timed[first_token]["tandem_timing"])


def test_json_reply_carries_the_stamps_only_when_asked(server, offline):
    _, expected = offline_chat(offline, MESSAGES, 6)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    timed = requests.post(server["url"] + "/v1/chat/completions", json=dict(body, tandem_timing=True), timeout=60).json()
    plain = requests.post(server["url"] + "/v1/chat/completions", json=body, timeout=60).json()
    assert timed["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"] == expected
    assert "tandem_timing" not in plain
    assert_stamps_in_order(timed["tandem_timing"])

    completion = requests.post(server["url"] + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "The router keeps", "max_tokens": 3, "tandem_timing": True}).json()
    assert list(completion["tandem_timing"]["stamps_ms"]) == list(STAMPS)


def test_a_growing_history_gets_the_offline_tokens_and_text(server, offline):
    """Turn after turn the ingress tokenizes only the new messages (router.prompt_tokenizer):
    the prompt must still be exactly the offline tokenization, and so the text."""
    messages = [{"role": "system", "content": "You are terse. " * 20},
                {"role": "user", "content": "Tell me about routers and <|im_end|> markers. " * 30}]
    for turn in range(3):
        ids, expected = offline_chat(offline, messages, 5)
        chunks = stream_chat(server["url"], messages, 5, tandem_timing=True)
        answer = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert answer == expected, turn
        assert chunks[-1]["usage"]["prompt_tokens"] == len(ids)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And turn {turn}?"}]


def test_metrics_have_the_stage_histograms(server):
    stream_chat(server["url"], MESSAGES, 2)
    text = requests.get(server["url"] + "/metrics", timeout=10).text
    counts = {line.split('stage="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("tandem_ttft_stage_seconds_count")}
    assert set(counts) == set(INTERVALS.values()) | {TOTAL}
    assert counts[TOTAL] >= 1 and counts["route"] >= 1
    assert "# TYPE tandem_ttft_stage_seconds histogram" in text


def test_every_replica_runs_serve_on_one_event_loop(server):
    """`serve_low_latency` (the default) reaches every replica's process: the ingress and the
    engine replica run user code and routers on Serve's main loop (workers.app.LOW_LATENCY_SERVE_ENV)."""
    import os

    import ray

    from tandem.workers.app import LOW_LATENCY_SERVE_ENV

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::timing#")]
    assert {a["name"].split("#")[1] for a in replicas} == {"OpenAIIngress", "LLMWorker"}
    for actor in replicas:
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        env = ray.get(handle.__ray_call__.remote(lambda _self: dict(os.environ)), timeout=30)
        assert {k: env.get(k) for k in LOW_LATENCY_SERVE_ENV} == LOW_LATENCY_SERVE_ENV, actor["name"]
