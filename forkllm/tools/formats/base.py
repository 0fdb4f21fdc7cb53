"""What a tool-call format is: how calls look in generated text (markers and a candidate reader for
the parser), how tools and past calls are written into a prompt whose chat template knows nothing
of tools, and the Lark grammar (llguidance's dialect) that forces calls for tool_choice
`required` or a named function."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

from forkllm.tools.parser import Candidate
from forkllm.tools.spec import ToolSpec

# How forced JSON is laid out: the spacing json.dumps uses, which is also how the prompt shows
# calls, so the model writes what it has just read. No free whitespace (a sampler could
# otherwise pad without end).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# A past call's arguments as the history carries them: an object, or the text the model wrote.
Arguments = dict[str, Any] | str


class ToolFormat(ABC):
    name: str
    markers: tuple[str, ...]
    separators: str = ""
    # A stop string that ends one call (parallel_tool_calls=false stops there), if the format has one.
    call_end: str | None = None

    @abstractmethod
    def candidate(self, tools: frozenset[str] | None, quota: int | None) -> Candidate: ...

    @abstractmethod
    def system_prompt(self, specs: list[ToolSpec]) -> str:
        """Instructions and signatures for a system message."""

    @abstractmethod
    def render_calls(self, calls: list[tuple[str, Arguments]]) -> str:
        """Past calls as the model would have written them."""

    def render_result(self, content: str) -> str:
        """A tool message's content as the model should read it."""
        return content

    @abstractmethod
    def grammar(self, specs: list[ToolSpec], parallel: bool) -> str:
        """A Lark grammar whose every sentence is one call (or, with `parallel`, one or more) of
        these tools, with arguments valid against their schemas."""


def signatures(specs: list[ToolSpec]) -> str:
    return "\n".join(json.dumps(s.as_openai(), ensure_ascii=False) for s in specs)


def arguments_object(arguments: Arguments) -> Any:
    """A past call's arguments as a value to embed in JSON: the object, the parsed text, or (text
    that is not JSON) the text itself."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def call_schema(spec: ToolSpec, arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call object: its name, then its arguments."""
    return {
        "type": "object",
        "properties": {"name": {"const": spec.name}, arguments_key: spec.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def json_rule(schema: dict[str, Any] | bool) -> str:
    """`%json {...}` for a Lark rule, laid out as JSON_LAYOUT says."""
    body: dict[str, Any] = {"x-guidance": JSON_LAYOUT}
    if isinstance(schema, bool):
        body.update({} if schema else {"not": {}})
    else:
        body.update(schema)
    return "%json " + json.dumps(body, ensure_ascii=False)


def call_from_object(
    obj: object, tools: frozenset[str] | None, arguments_keys: tuple[str, ...]
) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) if `obj` is a call of a known tool, else None. Arguments may be missing
    (no arguments) or given as JSON text of an object (some models write them so)."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or (tools is not None and name not in tools):
        return None
    present = [k for k in arguments_keys if k in obj]
    if len(present) > 1:
        return None
    arguments = obj[present[0]] if present else {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments, parse_constant=_refuse)
        except ValueError:
            return None
    return (name, arguments) if isinstance(arguments, dict) else None


def loads_object(text: str) -> object:
    """Strict JSON (no NaN/Infinity), or None."""
    try:
        return json.loads(text, parse_constant=_refuse)
    except ValueError:
        return None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
