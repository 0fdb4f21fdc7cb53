"""Tool definitions as OpenAI sends them (`{"type": "function", "function": {...}}`), checked once.

`tool_specs` turns a request's `tools` list into `ToolSpec`s or raises a `ToolFieldError` naming
the field as the server names it (`tools.1.function.parameters`), so a server answers 400 and the Python API raises a
ValueError that says what to fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolFieldError(ValueError):
    """Bad tool input; `param` is the field as the request spelled it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One callable function: its name, what it does, and the JSON schema of its arguments object."""

    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))
    description: str | None = None

    def as_openai(self) -> dict[str, Any]:
        """The definition as OpenAI and HF chat templates take it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def tool_specs(tools: object, field_name: str = "tools") -> list[ToolSpec]:
    """Check `tools` (OpenAI's list of function tools) and return their specs, in order."""
    if not isinstance(tools, list) or not tools:
        raise ToolFieldError(field_name, "must be a non-empty list of tools")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"{field_name}.{i}"
        if not isinstance(tool, dict):
            raise ToolFieldError(where, 'must be an object {"type": "function", "function": {...}}')
        unknown = sorted(set(tool) - {"type", "function"})
        if unknown:
            raise ToolFieldError(f"{where}.{unknown[0]}", "unknown field (not supported by this server)")
        if tool.get("type", "function") != "function":
            raise ToolFieldError(
                f"{where}.type", f"only 'function' tools are supported, got {tool.get('type')!r}"
            )
        specs.append(_function_spec(tool.get("function"), f"{where}.function"))
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolFieldError(f"{field_name}.{i}.function.name", f"duplicate tool name {name!r}")
    return specs


def _function_spec(function: object, where: str) -> ToolSpec:
    if not isinstance(function, dict):
        raise ToolFieldError(where, "must be an object with a name (and description, parameters)")
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ToolFieldError(f"{where}.{unknown[0]}", "unknown field (not supported by this server)")
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolFieldError(f"{where}.name", f"must be 1-64 letters, digits, '_' or '-', got {name!r}")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolFieldError(f"{where}.description", "must be a string")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolFieldError(f"{where}.strict", "must be true or false")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(EMPTY_PARAMETERS)
    check_parameters_schema(parameters, f"{where}.parameters")
    return ToolSpec(name=name, parameters=parameters, description=description)


def check_parameters_schema(schema: object, where: str) -> None:
    """A function's parameters: a JSON schema (checked against its metaschema) of an object."""
    if not isinstance(schema, dict):
        raise ToolFieldError(where, "must be a JSON schema object")
    kind = schema.get("type")
    if kind is not None and kind != "object":
        raise ToolFieldError(where, f"must describe an object (type 'object'), got type {kind!r}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f".{p}" for p in e.path)
        raise ToolFieldError(where + path, f"not a valid JSON schema: {e.message}") from None
