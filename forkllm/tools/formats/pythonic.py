"""Pythonic tool calls (Llama 3.2 / 4 style): a Python list of calls with keyword arguments,
`[get_weather(city="Paris"), search(query="x", limit=3)]`. Argument values are Python literals;
JSON's true/false/null are read as True/False/None too (grammar-forced values are JSON)."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from forkllm.tools.formats.base import Arguments, ToolFormat, arguments_object, json_rule, signatures
from forkllm.tools.parser import Accept, Reject
from forkllm.tools.spec import ToolSpec

_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_WS = " \t\r\n"
_OPENERS, _CLOSERS = "([{", ")]}"


class PythonicCandidate:
    """`[` name `(` keyword arguments `)` (`,` another call)* `]`. Each call is checked as it
    closes; the list is a call list once `]` closes it, or as soon as `quota` calls have closed
    (parallel_tool_calls=false stops there). Anything else is content from the `[` on."""

    def __init__(self, tools: frozenset[str] | None, quota: int | None) -> None:
        self.tools = tools
        self.quota = quota
        self.pos = 1  # after '['
        self.state = "before_name"
        self.call_start = 0
        self.brackets: list[str] = []  # open brackets inside the current call
        self.quote = ""  # the open string's quote character
        self.escaped = False
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def advance(self, text: str, final: bool) -> Accept | Reject | None:
        while self.pos < len(text):
            verdict = self._step(text, text[self.pos])
            self.pos += 1
            if verdict is not None:
                return verdict
        return Reject(len(text)) if final else None

    def _step(self, text: str, ch: str) -> Accept | Reject | None:  # noqa: PLR0911
        if self.state == "before_name":
            if ch in _WS:
                return None
            if not (ch.isascii() and (ch.isalpha() or ch == "_")):
                return Reject(1)
            self.state, self.call_start = "name", self.pos
            return None
        if self.state == "name":
            if ch == "(":
                self.state, self.brackets = "args", ["("]
            elif not (ch.isascii() and (ch.isalnum() or ch == "_")):
                return Reject(1)
            return None
        if self.state == "after_call":
            if ch in _WS:
                return None
            if ch == ",":
                self.state = "before_name"
                return None
            return Accept(self.pos + 1, self.calls) if ch == "]" else Reject(1)
        return self._args_step(text, ch)

    def _args_step(self, text: str, ch: str) -> Accept | Reject | None:
        if self.quote:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == self.quote:
                self.quote = ""
            elif ch == "\n":
                return Reject(1)
            return None
        if ch in "'\"":
            self.quote = ch
        elif ch in _OPENERS:
            self.brackets.append(ch)
        elif ch in _CLOSERS:
            if _OPENERS[_CLOSERS.index(ch)] != self.brackets.pop():
                return Reject(1)
            if not self.brackets:
                call = parse_call(text[self.call_start : self.pos + 1], self.tools)
                if call is None:
                    return Reject(1)
                self.calls.append(call)
                self.state = "after_call"
                if self.quota is not None and len(self.calls) >= self.quota:
                    return Accept(self.pos + 1, self.calls)
        return None


def parse_call(source: str, tools: frozenset[str] | None) -> tuple[str, dict[str, Any]] | None:
    """`name(key=literal, ...)` -> (name, arguments), or None."""
    try:
        node = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    name = node.func.id
    if tools is not None and name not in tools:
        return None
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:
            return None
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except ValueError:
            return None
    return name, arguments


def _literal(node: ast.expr) -> Any:
    """A JSON-representable Python literal (JSON's own true/false/null included)."""
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (str, bool, int, float))
    ):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("not a finite number")
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key, value in zip(node.keys, node.values):
            k = _literal(key) if key is not None else None
            if not isinstance(k, str):
                raise ValueError("object keys must be strings")
            out[k] = _literal(value)
        return out
    raise ValueError("not a literal")


def python_literal(value: Any) -> str:
    """A JSON value written as a Python literal."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


class Pythonic(ToolFormat):
    name = "pythonic"
    markers = ("[",)

    def candidate(self, tools: frozenset[str] | None, quota: int | None) -> PythonicCandidate:
        return PythonicCandidate(tools, quota)

    def system_prompt(self, specs: list[ToolSpec]) -> str:
        return (
            "You can call the functions below. Their signatures are JSON objects:\n"
            f"{signatures(specs)}\n\n"
            "To call functions, answer with only a Python list of calls with keyword arguments, "
            'for example [function_name(argument_name="value"), other_function(count=2)]. '
            "Otherwise answer in plain text."
        )

    def render_calls(self, calls: list[tuple[str, Arguments]]) -> str:
        parts = []
        for name, arguments in calls:
            value = arguments_object(arguments)
            if isinstance(value, dict):
                kwargs = ", ".join(f"{k}={python_literal(v)}" for k, v in value.items())
            else:  # arguments that were never an object: show them as the one argument they are
                kwargs = f"arguments={python_literal(value)}"
            parts.append(f"{name}({kwargs})")
        return "[" + ", ".join(parts) + "]"

    def grammar(self, specs: list[ToolSpec], parallel: bool) -> str:
        rules: list[str] = []
        for i, spec in enumerate(specs):
            extra: list[str] = []
            rules.append(f"call_{i}: {_call_rule(spec, i, extra)}")
            rules.extend(extra)
        call = "call: " + " | ".join(f"call_{i}" for i in range(len(specs)))
        start = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
        return "\n".join([start, call, *rules]) + "\n"


def _call_rule(spec: ToolSpec, i: int, rules: list[str]) -> str:
    """`"name(" kwargs ")"`: the schema's properties in their order, required ones always, optional
    ones or not, each value JSON valid against its property's schema; a schema without listed
    properties takes any keyword arguments with JSON values."""
    params = spec.parameters
    props = params.get("properties")
    open_call = json.dumps(f"{spec.name}(")
    if not isinstance(props, dict) or not props:
        if props is not None or params.get("additionalProperties") is False:
            return f'{open_call} ")"'  # declared empty: no arguments
        rules.append(f'kw_{i}: /[A-Za-z_][A-Za-z0-9_]*/ "=" {json_rule(True)}')
        return f'{open_call} (kw_{i} (", " kw_{i})*)? ")"'
    shared = {k: params[k] for k in ("$defs", "definitions") if k in params}
    required = set(params.get("required") or ())
    names = list(props)
    for j, key in enumerate(names):
        value = props[key] if isinstance(props[key], (dict, bool)) else True
        if isinstance(value, dict) and shared:
            value = {**shared, **value}
        rules.append(f"item_{i}_{j}: {json.dumps(key + '=')} {json_rule(value)}")
    # first_{i}_{j}: the arguments from property j on, none written yet;
    # rest_{i}_{j}: the same after at least one was written (so each is preceded by ", ").
    n = len(names)
    for j in range(n):
        item, nxt_first, nxt_rest = f"item_{i}_{j}", f"first_{i}_{j + 1}", f"rest_{i}_{j + 1}"
        if names[j] in required:
            rules.append(f"first_{i}_{j}: {item} {nxt_rest}")
        else:
            rules.append(f"first_{i}_{j}: {item} {nxt_rest} | {nxt_first}")
        if j == 0:
            continue  # an argument before the first one cannot have been written
        if names[j] in required:
            rules.append(f'rest_{i}_{j}: ", " {item} {nxt_rest}')
        else:
            rules.append(f'rest_{i}_{j}: ", " {item} {nxt_rest} | {nxt_rest}')
    rules.append(f'first_{i}_{n}: ""')
    rules.append(f'rest_{i}_{n}: ""')
    return f'{open_call} first_{i}_0 ")"'
