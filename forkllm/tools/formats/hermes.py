"""Hermes / Qwen / SmolLM2 style: each call is a JSON object inside `<tool_call>...</tool_call>`;
tool results come back inside `<tool_response>...</tool_response>`."""

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

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"


class HermesCandidate:
    """`<tool_call>`, whitespace, a JSON call object, whitespace, `</tool_call>`. At the end of the
    message a call whose closing tag is missing or cut short still counts (a stop string or the
    token limit may have taken it)."""

    def __init__(self, tools: frozenset[str] | None) -> None:
        self.tools = tools
        self.scanner = JsonObjectScanner(len(OPEN))
        self.call: tuple[str, dict] | None = None

    def advance(self, text: str, final: bool) -> Accept | Reject | None:
        if self.call is None:
            result = self.scanner.scan(text)
            if result is Scan.INVALID or (result is Scan.MORE and final):
                return Reject(len(OPEN))
            if result is Scan.MORE:
                return None
            self.call = call_from_object(
                loads_object(text[len(OPEN) : self.scanner.end]), self.tools, ("arguments", "parameters")
            )
            if self.call is None:
                return Reject(len(OPEN))
        end = self.scanner.end
        rest = text[end:].lstrip(_WS)
        ws = len(text) - end - len(rest)
        if rest.startswith(CLOSE):
            return Accept(end + ws + len(CLOSE), [self.call])
        if CLOSE.startswith(rest):  # nothing yet, or the closing tag so far
            return Accept(len(text), [self.call]) if final else None
        return Reject(len(OPEN))


class Hermes(ToolFormat):
    name = "hermes"
    markers = (OPEN,)
    call_end = CLOSE

    def candidate(self, tools: frozenset[str] | None, quota: int | None) -> HermesCandidate:
        return HermesCandidate(tools)

    def system_prompt(self, specs: list[ToolSpec]) -> str:
        return (
            "# Tools\n\n"
            "You may call one or more of the functions below to answer the user. Their signatures "
            "are JSON objects inside <tools></tools>:\n"
            f"<tools>\n{signatures(specs)}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"argument_name": "value"}}\n</tool_call>'
        )

    def render_calls(self, calls: list[tuple[str, Arguments]]) -> str:
        return "\n".join(
            f"{OPEN}\n"
            + json.dumps({"name": name, "arguments": arguments_object(arguments)}, ensure_ascii=False)
            + f"\n{CLOSE}"
            for name, arguments in calls
        )

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def grammar(self, specs: list[ToolSpec], parallel: bool) -> str:
        calls = json_rule({"anyOf": [call_schema(s, "arguments") for s in specs]})
        start = 'start: tool_call ("\\n" tool_call)*' if parallel else "start: tool_call"
        return f'{start}\ntool_call: "{OPEN}\\n" call_json "\\n{CLOSE}"\ncall_json: {calls}\n'
