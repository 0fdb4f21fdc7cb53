"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` (`arguments` accepted too),
optionally after `<|python_tag|>`, several separated by `;`."""

from __future__ import annotations

import json

from forkllm.tools.formats.base import (
    Arguments,
    ToolFormat,
    arguments_object,
    call_from_object,
    call_schema,
    json_rule,
    loads_object,
    signatures,
)
from forkllm.tools.jsonscan import JsonObjectScanner, Scan
from forkllm.tools.parser import Accept, Reject
from forkllm.tools.spec import ToolSpec

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonCandidate:
    """A JSON object that is a call. Not a call: a complete object is content as a whole (a call
    is never dug out of a larger object); invalid JSON is content up to where it broke."""

    def __init__(self, tools: frozenset[str] | None) -> None:
        self.tools = tools
        self.scanner: JsonObjectScanner | None = None

    def advance(self, text: str, final: bool) -> Accept | Reject | None:
        if self.scanner is None:
            self.scanner = JsonObjectScanner(len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0)
        result = self.scanner.scan(text)
        if result is Scan.INVALID:
            return Reject(self.scanner.end)
        if result is Scan.MORE:
            return Reject(len(text)) if final else None
        end = self.scanner.end
        start = len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0
        call = call_from_object(loads_object(text[start:end]), self.tools, ("parameters", "arguments"))
        return Accept(end, [call]) if call is not None else Reject(end)


class Llama3Json(ToolFormat):
    name = "llama3_json"
    markers = ("{", PYTHON_TAG)
    separators = ";"

    def candidate(self, tools: frozenset[str] | None, quota: int | None) -> Llama3JsonCandidate:
        return Llama3JsonCandidate(tools)

    def system_prompt(self, specs: list[ToolSpec]) -> str:
        return (
            "You can call the functions below. Their signatures are JSON objects:\n"
            f"{signatures(specs)}\n\n"
            "To call a function, answer with only a JSON object of the form "
            '{"name": "function_name", "parameters": {"argument_name": "value"}}; '
            "separate several calls with '; '. Otherwise answer in plain text."
        )

    def render_calls(self, calls: list[tuple[str, Arguments]]) -> str:
        return "; ".join(
            json.dumps({"name": name, "parameters": arguments_object(arguments)}, ensure_ascii=False)
            for name, arguments in calls
        )

    def grammar(self, specs: list[ToolSpec], parallel: bool) -> str:
        calls = json_rule({"anyOf": [call_schema(s, "parameters") for s in specs]})
        start = 'start: call_json ("; " call_json)*' if parallel else "start: call_json"
        return f"{start}\ncall_json: {calls}\n"
