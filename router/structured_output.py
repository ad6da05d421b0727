"""The request's structured-output fields as the engine's one constraint (`StructuredOutput`).

Accepted, at most one per request: OpenAI's `response_format` (`json_object`, `json_schema` with
its `schema`; `strict` or not, the output is held to the schema either way), and vLLM's extras
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`). A JSON schema is checked here against its
JSON Schema meta-schema (a bad schema is a 400 naming the field); whether the grammar library
supports everything it uses is known when the worker compiles it (also a 400). The schema
travels as compact JSON text with its property order kept (the order the output follows), so
equal schemas hit the worker's grammar cache.

No xgrammar here: the ingress stays free of torch.
"""
from __future__ import annotations

import json
from typing import Any

from tandem.protocol.sampling_params import StructuredOutput


class StructuredOutputError(ValueError):
    """A structured-output field the request cannot have; `param` names it (for the 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def requested_structured_output(req) -> StructuredOutput | None:
    """The constraint the request's fields (`router.openai_protocol.SamplingFields`) ask for;
    None without one. Raises StructuredOutputError."""
    asked: list[tuple[str, StructuredOutput]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise StructuredOutputError("response_format of type json_schema needs json_schema.schema",
                                        "response_format.json_schema")
        asked.append(("response_format", _json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")))
    if req.guided_json is not None:
        asked.append(("guided_json", _json_schema(req.guided_json, "guided_json")))
    if req.guided_regex is not None:
        asked.append(("guided_regex", _spec(StructuredOutput, "guided_regex", regex=req.guided_regex)))
    if req.guided_choice is not None:
        asked.append(("guided_choice", _spec(StructuredOutput, "guided_choice", choice=tuple(req.guided_choice))))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", _spec(StructuredOutput, "guided_grammar", grammar=req.guided_grammar)))
    so = req.structured_outputs
    if so is not None:
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                  "json_object": so.json_object or None}
        given = [name for name, value in fields.items() if value is not None]
        if len(given) != 1:
            raise StructuredOutputError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                                        f"json_object (got {given or 'none'})", "structured_outputs")
        name = given[0]
        param = f"structured_outputs.{name}"
        if name == "json":
            asked.append((param, _json_schema(so.json_, param)))
        elif name == "choice":
            asked.append((param, _spec(StructuredOutput, param, choice=tuple(so.choice))))
        elif name == "json_object":
            asked.append((param, StructuredOutput(json_object=True)))
        else:
            asked.append((param, _spec(StructuredOutput, param, **{name: fields[name]})))
    if len(asked) > 1:
        raise StructuredOutputError(f"only one structured-output field may be set, got {[p for p, _ in asked]}",
                                    asked[1][0])
    return asked[0][1] if asked else None


def check_json_schema(schema: Any, param: str) -> str:
    """The schema as compact JSON text, after checking it against its meta-schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise StructuredOutputError(f"{param} is not valid JSON: {error}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(f"{param} must be a JSON Schema object", param)
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except RecursionError:
        raise StructuredOutputError(f"{param} is nested too deeply", param) from None
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.path)
        raise StructuredOutputError(f"{param} is not a valid JSON Schema: {error.message}"
                                    + (f" (at {where})" if where else ""), param) from None
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _json_schema(schema: Any, param: str) -> StructuredOutput:
    return StructuredOutput(json_schema=check_json_schema(schema, param))


def _spec(cls, param: str, **fields) -> StructuredOutput:
    try:
        return cls(**fields)
    except ValueError as error:
        raise StructuredOutputError(f"{param}: {error}", param) from None
