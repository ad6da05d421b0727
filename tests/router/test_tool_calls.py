"""Tool calls without a server (router/tool_calls.py, router/structured_output.py): the parser
gives the same calls and content however the text is split into stream deltas; the structural
tag a plan compiles to, walked at random through xgrammar, only ever yields calls the parser
reads back with arguments valid for their tool; the prompt gets the tools the way its template
wants them; bad tools and schemas are errors naming their field."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from tandem.router.openai_protocol import ChatCompletionRequest, ChatMessage
from tandem.router.structured_output import StructuredOutputError, requested_structured_output
from tandem.router.tool_calls import (HERMES, LLAMA3_JSON, SYSTEM_PROMPT_HERMES, ToolCallError, ToolCallParser,
                                      chat_messages, plan_tools, template_tools, tool_call_format)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
                                                "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


def plan(fmt=SYSTEM_PROMPT_HERMES, tool_choice=None, parallel=True, tools=(WEATHER, TIME)):
    req = request(tools=list(tools), tool_choice=tool_choice, parallel_tool_calls=parallel)
    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, fmt)


def parse_whole(fmt, text):
    parser = ToolCallParser(fmt)
    deltas = [parser.feed(text), parser.finish()]
    return parser, deltas


def parse_split(fmt, text, sizes):
    """Fed in pieces of the given sizes (cycled), as a stream would."""
    parser, deltas, i, k = ToolCallParser(fmt), [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        deltas.append(parser.feed(text[i : i + n]))
        i, k = i + n, k + 1
    deltas.append(parser.finish())
    return parser, deltas


def summary(parser, deltas):
    """What a client would assemble from the deltas, next to what the parser holds."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.calls:
            entry = calls.setdefault(c.index, {"name": None, "arguments": ""})
            if c.name is not None:
                assert entry["name"] is None, "the name comes once, first"
                entry["name"] = c.name
            entry["arguments"] += c.arguments
    assert content == parser.content
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.name, c.arguments) for c in parser.calls]
    return content, [(c.name, c.arguments, c.complete) for c in parser.calls]


HERMES_TEXT = ('Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": -2}}\n</tool_call>\n')
LLAMA_TEXT = '{"name": "get_weather", "parameters": {"city": "a}\\"b{", "unit": "f"}}; {"name": "get_time", "parameters": {"zone": 3}}'


@pytest.mark.parametrize("fmt, text, expected", [
    (HERMES, HERMES_TEXT, ("Let me check.", [("get_weather", '{"city": "Paris", "unit": "c"}', True),
                                             ("get_time", '{"zone": -2}', True)])),
    (LLAMA3_JSON, LLAMA_TEXT, ("", [("get_weather", '{"city": "a}\\"b{", "unit": "f"}', True),
                                   ("get_time", '{"zone": 3}', True)])),
    (HERMES, "No call here: a <tool> tag and <tool_call without a call.  ",
     ("No call here: a <tool> tag and <tool_call without a call.", [])),
    (HERMES, 'Cut off <tool_call>\n{"name": "get_wea', ('Cut off <tool_call>\n{"name": "get_wea', [])),
    (HERMES, '<tool_call>\n{"name": "get_time", "arguments": {"zo', ("", [("get_time", '{"zo', False)])),
])
def test_parser_agrees_with_itself_whatever_the_split(fmt, text, expected):
    assert summary(*parse_whole(fmt, text)) == expected
    for sizes in ([1], [2, 3], [5], [7, 1, 13]):
        assert summary(*parse_split(fmt, text, sizes)) == expected, sizes


def _walk(compiled, tokenizer, seed: int, limit: int = 400) -> str:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, len(tokenizer))
    rng = random.Random(seed)
    out = []
    for _ in range(limit):
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].tolist()
        allowed = [t for t in range(len(tokenizer)) if (words[t // 32] >> (t % 32)) & 1]
        token = rng.choice(allowed)
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            break
        out.append(token)
    return tokenizer.decode(out)


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", True), ("required", False), ({"type": "function", "function": {"name": "get_time"}}, True),
    ("auto", True),
])
def test_constrained_calls_parse_and_validate(llama_dir, tool_choice, parallel):
    from transformers import AutoTokenizer

    from tandem.engine.structured import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    the_plan = plan(tool_choice=tool_choice, parallel=parallel)
    compiled = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}).compile(the_plan.structural_tag())
    seen_calls = 0
    for seed in range(12):
        text = _walk(compiled, tokenizer, seed, limit=60 if tool_choice == "auto" else 400)
        parser, deltas = parse_whole(the_plan.format, text)
        content, calls = summary(parser, deltas)
        if tool_choice == "auto":
            continue  # free text (a random walk rarely writes the trigger): what parses must validate
        assert content == "" and calls, text
        if not parallel or isinstance(tool_choice, dict):
            assert len(calls) == 1
        if isinstance(tool_choice, dict):
            assert calls[0][0] == "get_time"
        for name, arguments, complete in calls:
            assert complete
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
            seen_calls += 1
    assert seen_calls or tool_choice == "auto"


def test_auto_mode_forces_a_valid_call_once_triggered(llama_dir):
    """Free text may go anywhere, but text that starts a call must finish as a valid one."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from tandem.engine.structured import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    compiled = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id}).compile(plan().structural_tag())
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string("Sure. <tool_call>\n")
    assert not matcher.fork().accept_string('{"name": "get_nothing"')
    assert not matcher.fork().accept_string('{"name": "get_time", "arguments": {"zone": 99}')
    assert matcher.accept_string('{"name": "get_time", "arguments": {"zone": 11}}\n</tool_call> done')


def test_formats_follow_the_chat_template():
    assert tool_call_format("{{ messages }}") is SYSTEM_PROMPT_HERMES  # the test models' template
    qwen = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>{% endif %}"
    assert tool_call_format(qwen) is HERMES
    llama = "{% if tools %}Environment: ipython {{ tools }}<|python_tag|>{% endif %}"
    assert tool_call_format({"default": "x", "tool_use": llama}) is LLAMA3_JSON
    assert tool_call_format(None) is SYSTEM_PROMPT_HERMES


def test_prompt_messages_carry_tools_and_history():
    history = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]]
    the_plan = plan()
    fallback = chat_messages(history, SYSTEM_PROMPT_HERMES, the_plan)
    assert fallback[0]["role"] == "system" and fallback[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in fallback[0]["content"] and "<tool_call>" in fallback[0]["content"]
    assert fallback[2] == {"role": "assistant", "content": SYSTEM_PROMPT_HERMES.call_text(
        "get_weather", '{"city": "Paris", "unit": "c"}')}
    assert fallback[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    assert template_tools(SYSTEM_PROMPT_HERMES, the_plan) is None

    native = chat_messages(history, HERMES, plan(HERMES))
    assert native[0] == {"role": "system", "content": "Be brief."}
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert native[3] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}
    assert [t["function"]["name"] for t in template_tools(HERMES, plan(HERMES))] == ["get_weather", "get_time"]
    # No tools, no tool fields: the messages are what they always were.
    plain = [ChatMessage.model_validate({"role": "user", "content": "hi"})]
    assert chat_messages(plain, SYSTEM_PROMPT_HERMES, None) == [{"role": "user", "content": "hi"}]


def test_plans_and_their_errors():
    assert plan(tool_choice="none") is None
    assert plan().mode == "auto" and plan(tool_choice="required").mode == "required"
    named = plan(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.mode == "named" and [t["function"]["name"] for t in named.tools] == ["get_time"]
    with pytest.raises(ToolCallError, match="not among the tools") as error:
        plan(tool_choice={"type": "function", "function": {"name": "nope"}})
    assert error.value.param == "tool_choice"
    with pytest.raises(ToolCallError, match="unique"):
        plan(tools=(WEATHER, WEATHER))
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(ToolCallError, match="not a valid JSON Schema"):
        plan(tools=(bad,))
    with pytest.raises(ToolCallError, match="needs tools"):
        req = request(tool_choice="required")
        plan_tools(req.tools, req.tool_choice, True, SYSTEM_PROMPT_HERMES)


def test_structured_output_fields():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    spec = requested_structured_output(request(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}))
    assert spec.json_schema == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert requested_structured_output(request(response_format={"type": "json_object"})).json_object
    assert requested_structured_output(request(response_format={"type": "text"})) is None
    assert requested_structured_output(request(guided_json=json.dumps(schema))).json_schema == spec.json_schema
    assert requested_structured_output(request(guided_choice=["a", "b"])).choice == ("a", "b")
    assert requested_structured_output(request(guided_regex="[0-9]+")).regex == "[0-9]+"
    assert requested_structured_output(request(guided_grammar='root ::= "x"')).grammar == 'root ::= "x"'
    assert requested_structured_output(request(structured_outputs={"choice": ["y"]})).choice == ("y",)
    assert requested_structured_output(request()) is None
    for body, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ]:
        with pytest.raises(StructuredOutputError) as error:
            requested_structured_output(request(**body))
        assert error.value.param == param, body
