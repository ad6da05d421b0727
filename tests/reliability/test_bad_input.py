"""Bad input against the real endpoint: hypothesis-generated bodies (random JSON, every field
with wrong types, huge and negative numbers, NaN/Infinity, lone surrogates, invalid logprobs / n /
stop, deep nesting, invalid UTF-8, oversized bodies). Every reply is a 2xx or an OpenAI-style JSON
error with a 4xx, never a 5xx; afterwards the same engine replica is alive and serves.

Examples per property: `TANDEM_FUZZ_EXAMPLES` (default 15; raise it for a longer hunt)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import EDGE_API_KEY, EDGE_MAX_BODY_BYTES
from tests.reliability.probes import assert_openai_error, post, replica_names

AUTH = {"Authorization": f"Bearer {EDGE_API_KEY}"}
EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.timeout(300)

big_ints = st.sampled_from([0, -1, 1, 2**31, -(2**31), 2**63, -(2**63) - 1, 2**64 + 5, 10**30, -(10**30)])
weird_floats = st.sampled_from([0.0, -0.0, -1.5, 1e-320, 1e308, -1e308, float("nan"), float("inf"), float("-inf")])
bad_text = st.one_of(st.text(max_size=20),
                     st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=4),
                     st.sampled_from(["", "\x00", "\uffff", "\U0010ffff", "🙂" * 50]))
scalars = st.one_of(st.none(), st.booleans(), big_ints, st.integers(-50, 300), weird_floats,
                    st.floats(allow_nan=True), bad_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
messages = st.one_of(json_values, st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard"]), scalars),
     "content": st.one_of(bad_text, scalars, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                             "text": bad_text}), max_size=2))}),
    max_size=3))
FIELDS = {
    "model": st.one_of(st.just("tiny"), bad_text, scalars),
    "prompt": st.one_of(bad_text, st.lists(st.one_of(st.integers(-5, 2000), big_ints), max_size=6),
                        st.lists(bad_text, max_size=3), st.lists(st.lists(st.integers(-1, 1100), max_size=4), max_size=3),
                        json_values),
    "messages": messages,
    "max_tokens": st.one_of(st.integers(1, 8), big_ints, weird_floats, bad_text),
    "max_completion_tokens": st.one_of(st.integers(1, 8), big_ints, bad_text),
    "n": st.one_of(st.integers(-2, 20), big_ints, weird_floats),
    "temperature": st.one_of(weird_floats, st.floats(0, 5), bad_text),
    "top_p": st.one_of(weird_floats, st.floats(0, 1)),
    "top_k": st.one_of(big_ints, st.integers(-3, 50)),
    "min_p": weird_floats, "presence_penalty": weird_floats, "frequency_penalty": weird_floats,
    "repetition_penalty": weird_floats,
    "seed": st.one_of(big_ints, weird_floats, bad_text),
    "stop": st.one_of(bad_text, st.lists(bad_text, max_size=5), scalars),
    "stop_token_ids": st.one_of(st.lists(st.one_of(big_ints, st.integers(-3, 1100)), max_size=4), scalars),
    "logprobs": st.one_of(st.booleans(), big_ints, st.integers(-2, 30)),
    "top_logprobs": st.one_of(big_ints, st.integers(-2, 30)),
    "min_tokens": st.one_of(big_ints, st.integers(0, 20)),
    "stream": st.one_of(st.booleans(), scalars),
    "stream_options": json_values,
    "logit_bias": json_values, "echo": scalars, "suffix": scalars, "best_of": scalars, "tools": json_values,
    "user": scalars, "ignore_eos": scalars,
    # structured output and tools (docs/STRUCTURED.md): the engine compiles what passes the ingress
    "response_format": st.one_of(json_values, st.fixed_dictionaries(
        {"type": st.sampled_from(["json_object", "json_schema", "text", "xml"]),
         "json_schema": st.fixed_dictionaries({"name": bad_text, "schema": json_values})})),
    "guided_json": json_values, "guided_regex": bad_text, "guided_grammar": bad_text,
    "guided_choice": st.one_of(st.lists(bad_text, max_size=3), scalars), "tool_choice": json_values,
}
request_bodies = st.one_of(json_values, st.dictionaries(st.sampled_from(sorted(FIELDS)), st.nothing(), max_size=0)
                           .flatmap(lambda _: st.fixed_dictionaries({}, optional=FIELDS)))


def _encode(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # surrogates go out as \udXXX escapes


def _check(base_url: str, path: str, data: bytes, headers: dict | None = None) -> int:
    reply = post(f"{base_url}{path}", data, {**AUTH, **(headers or {})}, timeout=60)
    if reply.status_code == 200:
        content_type = reply.headers["content-type"]
        assert content_type.startswith(("application/json", "text/event-stream")), content_type
    else:
        assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300], data[:300])
        assert_openai_error(reply)
    return reply.status_code


@pytest.fixture(scope="module")
def engine_replicas(edge_app):
    return replica_names("edge", "LLMWorker")


@FUZZ
@given(body=request_bodies)
def test_fuzzed_completion_bodies_get_a_4xx_json_error_never_a_5xx(edge_app, body):
    _check(edge_app, "/v1/completions", _encode(body))


@FUZZ
@given(body=request_bodies)
def test_fuzzed_chat_bodies_get_a_4xx_json_error_never_a_5xx(edge_app, body):
    _check(edge_app, "/v1/chat/completions", _encode(body))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_get_a_4xx_json_error(edge_app, raw):
    assert _check(edge_app, "/v1/completions", raw) == 400


NASTY = [
    ("/v1/completions", b"[" * 7000 + b"]" * 7000, 400),  # nested past the JSON parser's recursion limit
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400),  # a lone surrogate in the prompt
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "hi", "repetition_penalty": Infinity}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "seed": 2**64}).encode(), 400),  # overflows the engine's seed
    ("/v1/completions", json.dumps({"prompt": "hi", "seed": -(2**64)}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": 0}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": 2**70}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": -1}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": 5,
                                          "top_logprobs": 99}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": [""]}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": 7}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop_token_ids": [-1]}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -5}).encode(), 400),
    ("/v1/completions", json.dumps({"prompt": [[1, 2]] * 17}).encode(), 400),  # more prompts than allowed
    ("/v1/completions", json.dumps({"prompt": "x" * (EDGE_MAX_BODY_BYTES + 10)}).encode(), 413),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400),
]


@pytest.mark.parametrize("path,data,status", NASTY, ids=[f"{i}-{s}" for i, (_, _, s) in enumerate(NASTY)])
def test_known_nasty_inputs(edge_app, path, data, status):
    reply = post(f"{edge_app}{path}", data, AUTH)
    assert reply.status_code == status, reply.text[:300]
    assert_openai_error(reply)


def test_the_same_engine_replica_is_alive_and_serves_after_the_fuzzing(edge_app, engine_replicas):
    assert replica_names("edge", "LLMWorker") == engine_replicas  # none crashed and was replaced
    reply = post(f"{edge_app}/v1/completions", {"prompt": "still here", "max_tokens": 3}, AUTH)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
