"""Tool calls in the chat API: how a model family writes them, how the tools reach the prompt,
the constraint that makes every call well formed, and the parser that turns the generated text
into OpenAI's `tool_calls` (whole, and as stream deltas).

- `ToolCallFormat`: the text of one call in a family's own syntax. Qwen 2.5 / Qwen 3 (and other
  Hermes-style templates): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`;
  Llama 3.1+: `{"name": "f", "parameters": {...}}`. `tool_call_format` reads it off the chat
  template. A template that does not render tools (the test models' simple one, Mistral's
  `[TOOL_CALLS]` ones, whose marker is a special token we do not constrain) gets the tools in a
  system message, with the Hermes syntax spelled out there, and that syntax is then used.
- `ToolPlan.structural_tag()`: an xgrammar structural tag (JSON) the engine compiles like any
  grammar. `auto`: free text, but once the format's trigger appears the call must be one of the
  tools with arguments valid for its schema; `required`: one or more calls and nothing else;
  a named function: exactly one call of it. `parallel_tool_calls: false` allows one call at most.
- `ToolCallParser`: incremental, fed the text as it streams; the non-streamed reply runs the same
  parser over its whole text, so both agree by construction. The generated text is constrained,
  so matching the format's literal pieces is exact; a call cut off by `max_tokens` stays partial.

`tool_choice: none` (or no tools): tools are neither rendered nor constrained nor parsed.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from tandem.protocol.sampling_params import StructuredOutput


class ToolCallError(ValueError):
    """A tools field the request cannot have; `param` names it (for the 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCallFormat:
    """One family's call syntax: `call_begin + name + arguments_glue + <arguments JSON> +
    call_end`, calls separated by `separator` when only calls may be written; `trigger` (a prefix
    of `call_begin`) is what starts a call inside free text."""

    name: str
    trigger: str
    call_begin: str
    arguments_glue: str
    call_end: str
    separator: str
    renders_tools: bool  # the chat template takes `tools` itself

    def call_text(self, name: str, arguments: str) -> str:
        return f"{self.call_begin}{name}{self.arguments_glue}{arguments}{self.call_end}"


HERMES = ToolCallFormat("hermes", "<tool_call>", '<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>",
                        "\n", renders_tools=True)
LLAMA3_JSON = ToolCallFormat("llama3_json", '{"name": ', '{"name": "', '", "parameters": ', "}", "; ",
                             renders_tools=True)
SYSTEM_PROMPT_HERMES = ToolCallFormat(**{**HERMES.__dict__, "renders_tools": False})


def tool_call_format(chat_template) -> ToolCallFormat:
    """The call syntax a chat template expects (a dict of named templates is read as one)."""
    if isinstance(chat_template, dict):
        chat_template = "\n".join(str(t) for t in chat_template.values())
    template = chat_template or ""
    if "tools" in template and "<tool_call>" in template:
        return HERMES
    if "tools" in template and ("<|python_tag|>" in template or "ipython" in template):
        return LLAMA3_JSON
    return SYSTEM_PROMPT_HERMES


_SYSTEM_PROMPT = """# Tools

You may call functions to answer. Their signatures, one per line:
<tools>
{tools}
</tools>

Write each call as a JSON object with the function's name and arguments, inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <arguments object>}}
</tool_call>"""


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class ToolPlan:
    """What a chat request with tools needs: its tools, the format and the mode."""

    format: ToolCallFormat
    tools: tuple[dict, ...]  # OpenAI tool objects ({"type": "function", "function": {...}})
    mode: Literal["auto", "required", "named"]
    parallel: bool

    def structural_tag(self) -> StructuredOutput:
        fmt = self.format
        tags = []
        for tool in self.tools:
            function = tool["function"]
            parameters = function.get("parameters") or {"type": "object"}
            tags.append({"type": "tag", "begin": fmt.call_begin + function["name"] + fmt.arguments_glue,
                         # at most one whitespace character in a row: bounded, still any JSON layout
                         "content": {"type": "json_schema", "json_schema": parameters, "max_whitespace_cnt": 1},
                         "end": fmt.call_end})
        if self.mode == "auto":
            body = {"type": "triggered_tags", "triggers": [fmt.trigger], "tags": tags,
                    "stop_after_first": not self.parallel}
        else:
            body = {"type": "tags_with_separator", "tags": tags, "separator": fmt.separator, "at_least_one": True,
                    "stop_after_first": self.mode == "named" or not self.parallel}
        return StructuredOutput(structural_tag=json.dumps({"type": "structural_tag", "format": body},
                                                          separators=(",", ":"), ensure_ascii=False))

    def parser(self) -> "ToolCallParser":
        return ToolCallParser(self.format)


def plan_tools(tools, tool_choice, parallel_tool_calls: bool, fmt: ToolCallFormat) -> ToolPlan | None:
    """The plan for a request's `tools` / `tool_choice` (router.openai_protocol types); None when
    no tool may be called. Raises ToolCallError."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolCallError("tool_choice needs tools", "tool_choice")
        return None
    if tool_choice == "none":
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolCallError("tool names must be unique", "tools")
    offered = tuple(t.model_dump(exclude_none=True) for t in tools)
    for tool in offered:
        parameters = tool["function"].get("parameters")
        if parameters is not None:
            _check_parameters(parameters, tool["function"]["name"])
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(fmt, offered, "auto", parallel_tool_calls)
    if tool_choice == "required":
        return ToolPlan(fmt, offered, "required", parallel_tool_calls)
    chosen = tool_choice.function.name
    if chosen not in names:
        raise ToolCallError(f"tool_choice names {chosen!r}, which is not among the tools ({names})", "tool_choice")
    return ToolPlan(fmt, tuple(t for t in offered if t["function"]["name"] == chosen), "named", False)


def _check_parameters(parameters: dict, name: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except RecursionError:
        raise ToolCallError(f"tool {name!r}: parameters is nested too deeply", "tools") from None
    except jsonschema.SchemaError as error:
        raise ToolCallError(f"tool {name!r}: parameters is not a valid JSON Schema: {error.message}",
                            "tools") from None


# ---------------------------------------------------------------------------- the prompt
def chat_messages(messages, fmt: ToolCallFormat, plan: ToolPlan | None) -> list[dict]:
    """The messages for the chat template. Without tool fields they are `{"role", "content"}`
    as ever. Earlier calls and tool results: in the template's own fields when it renders tools,
    else as text in the format (calls) and as `<tool_response>` user turns (results), which any
    template renders. The tools themselves go in a leading system message when the template does
    not render them."""
    native = fmt.renders_tools
    out: list[dict] = []
    for m in messages:
        entry = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            if native:
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                       for c in m.tool_calls]
            else:
                calls = "\n".join(fmt.call_text(c.function.name, c.function.arguments or "{}") for c in m.tool_calls)
                entry["content"] = f"{entry['content']}\n{calls}" if entry["content"] else calls
        if m.role == "tool":
            if native:
                if m.tool_call_id is not None:
                    entry["tool_call_id"] = m.tool_call_id
            else:
                entry = {"role": "user", "content": f"<tool_response>\n{entry['content']}\n</tool_response>"}
        out.append(entry)
    if plan is not None and not native:
        listing = _SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}" if out[0]["content"] else listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def template_tools(fmt: ToolCallFormat, plan: ToolPlan | None) -> list[dict] | None:
    """The `tools` argument for `apply_chat_template` (None: the template does not get them)."""
    return list(plan.tools) if plan is not None and fmt.renders_tools else None


def _arguments(text: str):
    """Templates expect an earlier call's arguments as a mapping (they `tojson` it)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


# ---------------------------------------------------------------------------- the parser
@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class CallDelta:
    """A piece of call `index`: `name` (and `id`) set on its first piece, then arguments text."""
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


class _State:
    TEXT, BEGIN, NAME, GLUE, ARGS, END = range(6)


class ToolCallParser:
    """Splits generated text into content and calls in `fmt`'s syntax, incrementally. Content
    is held back while it could still be the start of a call, and so is trailing whitespace:
    whitespace around calls is not content."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._buffer = ""
        self._state = _State.TEXT
        self._name = ""
        self._depth = 0  # JSON nesting inside the arguments
        self._in_string = False
        self._escaped = False
        self._started = False  # the arguments value has begun
        self._after_call = False  # a call just ended: a separator may follow
        self._space_before = ""  # whitespace before a call's start: content again if no call comes

    def feed(self, text: str) -> ParsedDelta:
        self._buffer += text
        delta = ParsedDelta()
        while self._step(delta):
            pass
        self.content += delta.content
        return delta

    def finish(self) -> ParsedDelta:
        """The end of the output: held text is released (as content unless it is whitespace, or
        a call that never got its name: its text is content too)."""
        delta = ParsedDelta()
        if self._state == _State.BEGIN:
            delta.content = self._space_before + self._buffer
        elif self._state in (_State.NAME, _State.GLUE):
            delta.content = self._space_before + self.fmt.call_begin + self._name + self._buffer
        elif self._state == _State.TEXT and self._buffer.strip():
            delta.content = self._buffer
        self._buffer = ""
        self.content += delta.content
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        """Consume what the buffer allows in the current state; False when it needs more text."""
        fmt, buf = self.fmt, self._buffer
        if not buf:
            return False
        if self._state == _State.TEXT:
            if self._after_call:  # the separator between calls is not content either
                trimmed = buf.lstrip()
                if not trimmed:
                    return False
                self._after_call = False
                separator = fmt.separator.strip()
                if separator and trimmed.startswith(separator):
                    self._buffer = trimmed[len(separator):]
                    return True
            at = buf.find(fmt.trigger)
            if at >= 0:
                text, self._buffer = buf[:at], buf[at:]
                kept = text.rstrip()  # whitespace before a call: not content
                delta.content += kept
                self._space_before = text[len(kept):]
                self._state = _State.BEGIN
                return True
            keep = _held_suffix(buf, fmt.trigger)
            text = buf[: len(buf) - keep]
            stripped = text.rstrip()
            if stripped:  # emit up to the trailing whitespace; hold that and a possible trigger start
                delta.content += stripped
                self._buffer = buf[len(stripped):]
            return False
        if self._state in (_State.BEGIN, _State.GLUE):
            literal = fmt.call_begin if self._state == _State.BEGIN else fmt.arguments_glue
            if buf.startswith(literal):
                self._buffer = buf[len(literal):]
                if self._state == _State.BEGIN:
                    self._state, self._name = _State.NAME, ""
                else:
                    self._space_before = ""
                    call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", self._name)
                    self.calls.append(call)
                    delta.calls.append(CallDelta(len(self.calls) - 1, call.id, call.name, ""))
                    self._state, self._depth, self._in_string, self._escaped, self._started = (
                        _State.ARGS, 0, False, False, False)
                return True
            if literal.startswith(buf):
                return False  # more text needed
            self._not_a_call(delta)
            return True
        if self._state == _State.NAME:
            at = buf.find('"')
            if at < 0:
                self._name += buf
                self._buffer = ""
                return False
            self._name += buf[:at]
            self._buffer = buf[at:]
            self._state = _State.GLUE
            return True
        if self._state == _State.ARGS:
            end = self._scan_arguments(buf)
            piece = buf if end is None else buf[:end]
            if not self._started:
                piece = piece.lstrip()
            if piece:
                self._started = True
                self.calls[-1].arguments += piece
                delta.calls.append(CallDelta(len(self.calls) - 1, None, None, piece))
            if end is None:
                self._buffer = ""
                return False
            self._buffer = buf[end:]
            self._state = _State.END
            return True
        # END: the call's closing text (whitespace may precede it)
        trimmed = buf.lstrip()
        if not trimmed:
            return False
        if trimmed.startswith(fmt.call_end):
            self._buffer = trimmed[len(fmt.call_end):]
            self.calls[-1].complete = True
            self._state, self._after_call = _State.TEXT, True
            return True
        if fmt.call_end.startswith(trimmed):
            return False
        self._state = _State.TEXT  # not the expected end: the rest is content
        return True

    def _scan_arguments(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in `text` (an index into it), or None."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
                if self._depth < 0:  # a scalar value, ended by the call's closing text
                    self._depth = 0
                    return i
        return None

    def _not_a_call(self, delta: ParsedDelta) -> None:
        """Text that began like a call but is not one (only unconstrained text can do this):
        its first character is content, and scanning resumes after it."""
        text = self._buffer if self._state == _State.BEGIN else self.fmt.call_begin + self._name + self._buffer
        delta.content += self._space_before + text[0]
        self._space_before = ""
        self._buffer = text[1:]
        self._state = _State.TEXT


def _held_suffix(text: str, trigger: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `trigger`."""
    for n in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-n:]):
            return n
    return 0


# ------------------------------------------------------------------- replies (both shapes)
def chat_message(text: str, finish_reason: str | None, plan: ToolPlan | None):
    """A non-streamed choice's message and finish reason: with a plan, the text parsed into
    content and `tool_calls` (finish reason "tool_calls" when the model called and stopped)."""
    from tandem.router.openai_protocol import ChatResponseMessage, FunctionCall, ToolCall

    if plan is None:
        return ChatResponseMessage(content=text), finish_reason
    parser = plan.parser()
    parser.feed(text)
    parser.finish()
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parser.calls]
    message = ChatResponseMessage(content=parser.content or None, tool_calls=calls or None)
    return message, _finish_reason(finish_reason, bool(calls))


class StreamedChoices:
    """Each streamed choice's deltas: the text as content, or, with a plan, parsed on the fly
    into content and OpenAI tool-call deltas (one parser per choice)."""

    def __init__(self, plan: ToolPlan | None, num_choices: int) -> None:
        self._parsers = [plan.parser() for _ in range(num_choices)] if plan is not None else None

    def delta(self, index: int, text: str, finish_reason: str | None):
        from tandem.router.openai_protocol import ChatDelta, FunctionCallDelta, ToolCallDelta

        if self._parsers is None:
            return ChatDelta(content=text), finish_reason
        parser = self._parsers[index]
        parsed = parser.feed(text)
        if finish_reason is not None:
            rest = parser.finish()
            parsed.content += rest.content
        calls = [ToolCallDelta(index=c.index, id=c.id, type="function" if c.id else None,
                               function=FunctionCallDelta(name=c.name, arguments=c.arguments))
                 for c in parsed.calls]
        content = parsed.content if parsed.content or not calls else None
        return ChatDelta(content=content, tool_calls=calls or None), _finish_reason(finish_reason, bool(parser.calls))


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason
