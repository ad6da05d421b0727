"""Structured output and tool calls end to end: the official `openai` client against a real local
Serve app (`workers.app.build_app`) on a tiny random-weight Llama, whose samples follow nothing
but the grammar's mask. With a JSON schema, every one of 50 sampled completions (temperature 1,
50 seeds) parses and validates; streamed and non-streamed replies agree; tool calls arrive as the
client's own objects, whole and as stream deltas; a constrained request does not change an
unconstrained one's tokens; bad schemas and unsupported combinations are 400s naming the field."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests
from ray import serve

from tandem.engine.make_model import make_model
from tandem.workers.app import build_app
from tests.router.serve_harness import local_serve

ENGINE_KWARGS = {"num_kv_blocks": 1024, "max_model_len": 2048, "max_num_seqs": 16}  # tool listings: ~700 tokens
pytestmark = pytest.mark.timeout(420)

# Bounded values and compact JSON: a complete object always fits in MAX_TOKENS (docs/STRUCTURED.md).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 3},
        "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "active", "address"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MAX_TOKENS = 200  # the longest object PERSON allows is ~170 tokens (each string char up to 4 byte tokens)
MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Describe a user."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
                   "required": ["utc_offset"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
# Parallel calls: after each call a random model stops or writes another about as often; 1200
# tokens hold ~15 calls (~70 tokens each), which the fixed seeds below stay well under.
TOOL_TOKENS = 1200
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("structured") / "llama", "llama", seed=3))
    with local_serve() as url:
        serve.run(build_app(dict(model=model_dir, served_model_name="tiny", engine_kwargs=ENGINE_KWARGS,
                                 ingress_num_cpus=0, max_n=16)), name="api", route_prefix="/")
        yield {"url": url, "model_dir": model_dir}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def person(client, seed: int, stream: bool = False) -> tuple[str, str]:
    """The content and finish reason of one sampled chat reply under PERSON."""
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                  response_format=RESPONSE_FORMAT)
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return content, finish


def test_fifty_sampled_completions_all_validate(client):
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda seed: person(client, seed), range(50)))
    for content, finish in replies:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), PERSON)  # strict json.loads: no raw control characters
    assert len({content for content, _ in replies}) > 40  # 50 seeds, really sampled


def test_streamed_and_non_streamed_agree(client):
    for seed in (3, 4):
        whole = person(client, seed)
        assert person(client, seed, stream=True) == whole
        jsonschema.validate(json.loads(whole[0]), PERSON)


def test_json_object_and_vllm_extras(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=1.0, seed=1,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")
    regex = client.completions.create(model="tiny", prompt="Phone:", max_tokens=20, temperature=1.0, seed=2,
                                      extra_body={"guided_regex": r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", regex.choices[0].text)
    assert regex.choices[0].finish_reason == "stop"
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, n=6,
                                            seed=5, extra_body={"guided_choice": ["yes", "no", "maybe so"]})
    assert {c.message.content for c in choice.choices} <= {"yes", "no", "maybe so"}
    grammar = client.completions.create(model="tiny", prompt="Math:", max_tokens=30, temperature=1.0, seed=6,
                                        extra_body={"guided_grammar": 'root ::= num " + " num " = " num\n'
                                                                      'num ::= [1-9] [0-9]?'})
    assert re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", grammar.choices[0].text)
    schema = client.completions.create(model="tiny", prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=7,
                                       extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(schema.choices[0].text), PERSON)


def test_a_constrained_request_leaves_an_unconstrained_one_alone(client):
    def free() -> str:
        return client.completions.create(model="tiny", prompt="The router keeps", max_tokens=40, temperature=1.0,
                                         seed=99, extra_body={"ignore_eos": True}).choices[0].text

    alone = free()
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(person, client, seed) for seed in range(100, 107)]
        together = pool.submit(free)
        assert together.result() == alone
        for future in constrained:
            jsonschema.validate(json.loads(future.result()[0]), PERSON)


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or TOOL_SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_required_tool_calls_parse_into_the_clients_objects(client):
    for seed in range(6):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                               tools=TOOLS, tool_choice="required", max_tokens=TOOL_TOKENS,
                                               temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        _check_calls(choice.message.tool_calls)
    single = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=MAX_TOKENS, temperature=1.0, seed=11)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_tool_choice_calls_that_function(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=MAX_TOKENS, temperature=1.0,
        seed=3)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1
    _check_calls(calls, names=["get_time"])


def _streamed_calls(client, **kwargs):
    """Tool calls assembled from stream deltas the way a client does (by index)."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id is not None:
                    assert entry["id"] is None and delta.type == "function" and delta.function.name
                    entry["id"], entry["name"] = delta.id, delta.function.name
                entry["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], content, finish


def test_streamed_tool_calls_agree_with_the_whole_reply(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                  tool_choice="required", max_tokens=TOOL_TOKENS, temperature=1.0, seed=21)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, content, finish = _streamed_calls(client, **kwargs)
    assert finish == whole.finish_reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls)


def test_auto_tool_choice_and_a_conversation_with_tool_results(client):
    """With `auto` the model may answer or call; whatever it does is well formed. The history
    of a call and its result goes back in as the client sends it."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    for seed in range(3):
        reply = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="auto",
                                               max_tokens=30, temperature=1.0, seed=seed)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        if message.tool_calls:
            complete = message.tool_calls if finish != "length" else message.tool_calls[:-1]  # the last may be cut
            if complete:
                _check_calls(complete)
        elif finish == "stop":  # (a call cut off before its name stays text)
            assert message.content is not None and "<tool_call>" not in message.content
    none = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server["url"] + path, json=body, timeout=60)


CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8}
BAD = [
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({**CHAT, "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({**CHAT, "tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice"),
    ({**CHAT, "min_tokens": 2, "response_format": {"type": "json_object"}}, None),
    # Valid JSON Schema the worker's grammar library cannot honour: refused by the engine.
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, None),
    ({**CHAT, "guided_regex": "(?<=a)b"}, None),
    ({**CHAT, "guided_grammar": "root ::= "}, None),
]


@pytest.mark.parametrize("body, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_structured_requests_are_400s(client, server, body, param):
    reply = _post(server, "/v1/chat/completions", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
