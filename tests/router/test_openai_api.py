"""The OpenAI-compatible endpoint, end to end: the real `openai` client against a real local
Serve app (`workers.app.build_app`) running the real engine on a tiny random-weight Llama.
Replies must carry the offline engine's greedy tokens; every bad input gets its 4xx and a JSON
error while the server keeps serving; a client leaving mid-stream frees the engine's blocks.

One Ray cluster and two apps per module (Ray and replica start-up are the slow part):
`api` at `/` and `secure` at `/secure` (API key, tiny in-flight bound)."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from ray import serve

from tandem.workers.app import build_app
from tandem import LLM, SamplingParams
from tests.router.serve_harness import local_serve
from tandem.engine.make_model import make_model

ENGINE_KWARGS = {"num_kv_blocks": 96, "max_model_len": 256, "max_num_seqs": 16}
API_KEY = "tandem-test-key"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("openai") / "llama", "llama", seed=3))
    with local_serve() as url:
        common = dict(model=model_dir, served_model_name="tiny", engine_kwargs=ENGINE_KWARGS, ingress_num_cpus=0)
        serve.run(build_app(dict(common, max_body_bytes=64 << 10)), name="api", route_prefix="/")
        serve.run(build_app(dict(common, api_key=API_KEY, max_in_flight=2)), name="secure", route_prefix="/secure")
        yield {"url": url, "model_dir": model_dir}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(server) -> LLM:
    return LLM(server["model_dir"], **ENGINE_KWARGS)


def greedy(offline: LLM, prompt, max_tokens: int, **extra):
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **extra))[0].outputs[0]


def chat_prompt_ids(offline: LLM, messages: list[dict]) -> list[int]:
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def worker_stats(app: str = "api"):
    return serve.get_deployment_handle("LLMWorker", app_name=app).stats.remote().result(timeout_s=30).engine


PROMPT = "The router keeps each conversation on the replica"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world! How are you?"}]


def test_completions_match_the_offline_engine(client, offline):
    expected = greedy(offline, PROMPT, 12, ignore_eos=True)
    num_prompt_tokens = len(offline.get_tokenizer().encode(PROMPT))

    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (num_prompt_tokens, 12)
    assert reply.usage.total_tokens == num_prompt_tokens + 12

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == num_prompt_tokens

    by_ids = client.completions.create(model="tiny", prompt=offline.get_tokenizer().encode(PROMPT), max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected.text


def test_chat_matches_the_offline_engine(client, offline):
    prompt_ids = chat_prompt_ids(offline, MESSAGES)
    expected = greedy(offline, {"prompt_token_ids": prompt_ids}, 10)

    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if len(expected.token_ids) == 10 else "stop")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_stop_strings_end_the_text_before_them(client, offline):
    full = greedy(offline, PROMPT, 24, ignore_eos=True).text
    stop = full[6:9]
    assert stop.strip(), f"pick another slice of {full!r}"
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    kept = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


def test_n_choices_and_usage(client, offline):
    expected = greedy(offline, PROMPT, 8, ignore_eos=True)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [expected.text] * 2
    assert reply.usage.completion_tokens == 16

    sampled = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7,
                                             n=2, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    for chunk in sampled:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 12
    assert all(texts.values())


def test_logprobs(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content

    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                           extra_body={"ignore_eos": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert requests.get(server["url"] + "/health", timeout=10).status_code == 200

    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    deadline = time.time() + 20
    while True:
        text = requests.get(server["url"] + "/metrics", timeout=10).text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        if values.get("tandem_prompt_tokens_total", 0) > 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    for name in ("tandem_prompt_tokens_total", "tandem_generation_tokens_total", "vllm:prompt_tokens_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "tandem_ingress_requests_total"):
        assert name in values, name
    assert values["tandem_prompt_tokens_total"] > 0 and values["tandem_generation_tokens_total"] > 0
    assert 'replica="' in text


def _post(url: str, body: bytes, headers: dict | None = None) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=30)


BAD_INPUTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi"', 400),  # malformed JSON
    ("/v1/completions", b'["not", "an", "object"]', 400),
    ("/v1/completions", json.dumps({"model": "tiny"}).encode(), 400),  # no prompt
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": 50}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": [5, 10**7]}).encode(), 400),  # token id outside the vocab
    ("/v1/completions", json.dumps({"prompt": []}).encode(), 400),
    ("/v1/completions", json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404),
    ("/v1/completions", json.dumps({"prompt": "hello " * 400}).encode(), 400),  # over the context length
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 100_000}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": 100}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "min_tokens": 9, "max_tokens": 3}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "x" * (70 << 10)}).encode(), 413),  # body over 64 KiB
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "top_logprobs": 2}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_completion_tokens": 0}).encode(), 400),
]


@pytest.mark.parametrize("path,body,status", BAD_INPUTS, ids=[f"{i}-{s}" for i, (_, _, s) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(client, server, path, body, status):
    response = _post(server["url"] + path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] is None or isinstance(error["code"], str), error  # OpenAI's convention
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_client_disconnect_frees_the_engine_blocks(server):
    before = worker_stats()
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
    with requests.post(server["url"] + "/v1/completions", data=body, stream=True, timeout=30,
                       headers={"Content-Type": "application/json"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip((x for x in lines if x), range(3))]
        assert all(line.startswith(b"data: {") for line in received)
    # The connection is closed: Serve cancels the ingress, the ingress the worker's stream,
    # and the worker aborts the engine request.
    deadline = time.time() + 30
    while True:
        stats = worker_stats()
        if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
            break
        assert time.time() < deadline, f"blocks still held after the client left: {stats}"
        time.sleep(0.1)
    assert stats.generation_tokens_total - before.generation_tokens_total < 200  # aborted, not finished


def test_api_key_is_required_when_configured(server):
    url = server["url"] + "/secure/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = _post(url, body, headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert requests.get(server["url"] + "/secure/health", timeout=10).status_code == 200
    keyed = openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key=API_KEY, max_retries=0)
    assert keyed.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key="nope", max_retries=0).models.list()


def test_overload_answers_429_with_retry_after(server):
    url = server["url"] + "/secure/v1/completions"
    body = json.dumps({"prompt": PROMPT, "max_tokens": 120, "ignore_eos": True}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _post(url, body, headers), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] == "1" and rejected.json()["error"]["code"] == "overloaded"
    assert _post(url, json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), headers).status_code == 200


def test_tandem_bench_against_the_real_endpoint(server, tmp_path):
    """`tandem bench` against this real Tandem app: every request succeeds, tokens come from
    usage, and the server's /metrics deltas (prefix-cache queries) are reported."""
    from tandem.cluster.cli import build_parser

    out = tmp_path / "bench"
    args = build_parser().parse_args([
        "bench", "run", "--url", server["url"], "--endpoint", "completions", "--workload", "rag",
        "--documents", "2", "--document-tokens", "120", "--question-tokens", "8", "--output-tokens", "8",
        "--num-requests", "8", "--arrival", "closed", "--concurrency", "4", "--tokenizer", server["model_dir"],
        "--out", str(out), "--no-plots", "--no-progress",
    ])
    assert args._module.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    text = json.dumps(report)
    summary = report["stages"][0]["summary"]
    assert summary["succeeded"] == 8 and summary["failed"] == 0 and not summary["errors"], text[:2000]
    assert summary["usage_missing"] == 0 and summary["output_token_throughput"] > 0
    records = report["stages"][0]["requests"]
    assert all(r["output_tokens"] == 8 and r["ttft_ms"] > 0 for r in records if not r["warmup"])
