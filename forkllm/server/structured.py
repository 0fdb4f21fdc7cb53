"""A request's structured-output fields -> SamplingParams.structured, checked before any work.

Four spellings ask for the same thing: OpenAI's `response_format` (`json_object`, `json_schema`;
vLLM adds `structural_tag`), vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`, and vLLM's newer `structured_outputs` object. A request may use one; two are a
400 naming the second. A schema or grammar the grammar library cannot compile is a 400 naming the
field as the request spelled it, found here rather than when the engine admits the request (a
stream would already have answered 200 by then)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from forkllm.server.errors import APIError
from forkllm.server.protocol import ResponseFormat, SamplingRequest
from forkllm.structured.params import StructuredOutputsParams
from forkllm.structured.structural_tag import schema_error, to_lark


@dataclass(frozen=True)
class StructuredRequest:
    """What the request asked for and the field it used (named in errors)."""

    params: StructuredOutputsParams
    field: str


def structured_request(req: SamplingRequest) -> StructuredRequest | None:
    """The request's grammar, or None for unconstrained text. Raises a 400 naming the field."""
    asked: list[StructuredRequest] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        asked.append(_response_format(fmt))
    guided = {
        "guided_json": ("json", req.guided_json),
        "guided_regex": ("regex", req.guided_regex),
        "guided_choice": ("choice", req.guided_choice),
        "guided_grammar": ("grammar", req.guided_grammar),
    }
    for field, (kind, value) in guided.items():
        if value is not None:
            asked.append(_make(field, **{kind: value}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        values = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": bool(so.json_object),
            "structural_tag": so.structural_tag,
        }
        given = [k for k, v in values.items() if v not in (None, False)]
        field = f"structured_outputs.{given[0]}" if len(given) == 1 else "structured_outputs"
        asked.append(_make(field, disable_any_whitespace=so.disable_any_whitespace, **values))
    if len(asked) > 1:
        first, second = asked[0].field.split(".")[0], asked[1].field.split(".")[0]
        raise APIError(
            400,
            f"{second} and {first} both constrain the output; give one of them",
            param=second,
        )
    return asked[0] if asked else None


def _response_format(fmt: ResponseFormat) -> StructuredRequest:
    if fmt.type != "json_schema" and fmt.json_schema is not None:
        raise APIError(
            400, "response_format.json_schema is only for type 'json_schema'", param="response_format"
        )
    if fmt.type != "structural_tag" and (fmt.structures is not None or fmt.triggers is not None):
        raise APIError(
            400,
            "response_format.structures and .triggers are only for type 'structural_tag'",
            param="response_format",
        )
    if fmt.type == "structural_tag":  # vLLM's OpenAI-server form of structured_outputs.structural_tag
        tag = {"type": "structural_tag", "structures": fmt.structures, "triggers": fmt.triggers}
        return _make("response_format", structural_tag=tag)
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(
            400,
            "response_format of type 'json_schema' needs a json_schema object {name, schema, strict}",
            param="response_format.json_schema",
        )
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    field = "response_format.json_schema.schema" if schema is not None else "response_format"
    return _make(field, json=schema) if schema is not None else _make(field, json_object=True)


def _make(field: str, **kw: Any) -> StructuredRequest:
    try:
        params = StructuredOutputsParams(**kw)
    except ValueError as e:
        message = str(e)
        if not field.startswith("structured_outputs"):  # say it as the request did
            message = re.sub(r"^structured_outputs(\.\w+)?", field, message)
        raise APIError(400, message, param=field) from e
    return StructuredRequest(params, field)


def check_compiles(asked: StructuredRequest) -> None:
    """A JSON schema must be a valid schema and llguidance must compile it; a regex or grammar
    must compile. Raises a 400 naming the field. (Runs off the event loop: a big schema takes
    milliseconds.)"""
    params = asked.params
    schema = params.schema()
    if isinstance(schema, dict):
        _check_schema(asked, schema, "")
    for i, s in enumerate(params.structures()):
        _check_schema(asked, s.schema, f": structures[{i}].schema")
    error = grammar_error(params)
    if error:
        raise APIError(400, f"{asked.field}: the grammar library cannot use this: {error}", param=asked.field)


def _check_schema(asked: StructuredRequest, schema: dict[str, Any], where: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f".{p}" for p in e.path)
        raise APIError(
            400, f"{asked.field}{where}{path}: not a valid JSON schema: {e.message}", param=asked.field
        ) from None


def grammar_error(params: StructuredOutputsParams) -> str:
    """llguidance's complaint about the schema, regex or grammar these params carry, or '' if it
    compiles (a choice or any-object always does)."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    matcher = llguidance.LLMatcher
    try:
        if params.json is not None:
            schema = params.schema()
            text = matcher.grammar_from_json_schema(
                schema if isinstance(schema, dict) else json.dumps(schema)
            )
        elif params.regex is not None:
            text = matcher.grammar_from_regex(params.regex)
        elif params.grammar is not None:
            text = matcher.grammar_from_lark(any_to_lark(params.grammar))  # GBNF is converted
        elif params.structural_tag is not None:
            structures = params.structures()  # triggers as text: no tokenizer here
            return _one_line(schema_error(structures)) or _validate(to_lark(structures))
        else:
            return ""
    except Exception as e:  # the GBNF converter raises its own error types
        return _one_line(str(e)) or type(e).__name__
    return _validate(text)


def lark_error(grammar: str) -> str:
    """llguidance's complaint about a Lark grammar, or '' if it compiles."""
    import llguidance

    return _validate(llguidance.LLMatcher.grammar_from_lark(grammar))


def _validate(grammar: str) -> str:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return _one_line(messages[0]) if is_error and messages else ""


def _one_line(message: str) -> str:
    """llguidance's multi-line message (source excerpts, carets) as one line."""
    lines = [line.strip() for line in message.strip().splitlines()]
    text = " ".join(line for line in lines if line and set(line) - {"^", " "})
    return text if len(text) <= 500 else text[:497] + "..."
