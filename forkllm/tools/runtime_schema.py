"""Tools the engine runs itself: a Python callable and the OpenAI function schema the model sees.

`as_tool` accepts a plain callable (its JSON schema comes from the signature's type hints and the
docstring: the first paragraph describes the function, a Google-style `Args:` section its
parameters), a `Tool`, or an OpenAI tool dict paired with its callable (`(spec, fn)`).
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    """A callable the engine may run when the model calls `name` (OpenAI function-tool fields)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if not callable(self.fn):
            raise ValueError(f"tool {self.name!r}: its function is not callable")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema object")

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool dict ({"type": "function", "function": {...}})."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


ToolLike = Tool | Callable[..., Any] | tuple[Mapping[str, Any], Callable[..., Any]]


def as_tools(tools: Iterable[ToolLike]) -> dict[str, Tool]:
    """Tools by name; a repeated name is an error."""
    out: dict[str, Tool] = {}
    for i, t in enumerate(tools):
        tool = as_tool(t, f"tools[{i}]")
        if tool.name in out:
            raise ValueError(f"tools[{i}]: a tool named {tool.name!r} is given twice")
        out[tool.name] = tool
    return out


def as_tool(obj: ToolLike, where: str = "tool") -> Tool:
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, tuple):
        if len(obj) != 2 or not isinstance(obj[0], Mapping) or not callable(obj[1]):
            raise ValueError(f"{where} must be (OpenAI tool dict, callable)")
        return _from_spec(obj[0], obj[1], where)
    if callable(obj):
        return tool_from_function(obj)
    raise ValueError(f"{where} must be a callable, a Tool, or (OpenAI tool dict, callable)")


def _from_spec(spec: Mapping[str, Any], fn: Callable[..., Any], where: str) -> Tool:
    f = spec.get("function", spec) if spec.get("type", "function") == "function" else None
    if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
        raise ValueError(f"{where}: the tool dict needs type 'function' and function.name")
    params = f.get("parameters") or {"type": "object", "properties": {}}
    return Tool(str(f["name"]), str(f.get("description") or ""), dict(params), fn)


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool from a function's signature and docstring."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    props: dict[str, Any] = {}
    required: list[str] = []
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise ValueError(
                f"tool {fn.__name__!r}: parameter {pname!r} is positional-only (calls pass keywords)"
            )
        schema, optional = _schema_of(hints.get(pname, p.annotation))
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        if p.default is not p.empty:
            if _jsonable(p.default):
                schema["default"] = p.default
        elif not optional:
            required.append(pname)
        props[pname] = schema
    params: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return Tool(name or str(getattr(fn, "__name__", "tool")), summary, params, fn)


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _schema_of(tp: Any) -> tuple[dict[str, Any], bool]:
    """(JSON schema of a type hint, whether None is allowed)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}, False
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}, False
    if tp is type(None):
        return {"type": "null"}, True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            return _schema_of(rest[0])[0], optional
        return {"anyOf": [_schema_of(a)[0] for a in rest]}, optional
    if origin is typing.Literal:
        return {"enum": list(args)}, False
    if tp in (list, tuple, set) or origin in (list, tuple, set, Iterable):
        item = _schema_of(args[0])[0] if args else {}
        return {"type": "array", "items": item} if item else {"type": "array"}, False
    if tp is dict or origin in (dict, Mapping):
        return {"type": "object"}, False
    return {}, False


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Raises|Yields|Examples?|Notes?):\s*$")
_ARG = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_ARG_SECTIONS = ("Args", "Arguments", "Parameters", "Params")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary: the first paragraph before any section, Args-section descriptions by name)."""
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    base = -1  # indent of the section's argument lines
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        if _SECTION.match(stripped):
            section, base, current = _SECTION.match(stripped).group(1), -1, None  # type: ignore[union-attr]
            continue
        if section is None:
            summary.append(line)
            continue
        if section not in _ARG_SECTIONS or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if base < 0:
            base = indent
        m = _ARG.match(stripped) if indent == base else None
        if m:
            current = m.group(1).lstrip("*")
            args[current] = m.group(3).strip()
        elif current is not None:
            args[current] = (args[current] + " " + stripped).strip()
    text = "\n".join(summary).strip()
    return " ".join(text.split("\n\n")[0].split()), args
