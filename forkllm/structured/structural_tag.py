"""Structural tags (vLLM's `structural_tag`): free text in which a trigger starts a JSON structure.

`{"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}`:
the text is free until a trigger appears; from there it must go on with the rest of the `begin`
of a structure that starts with that trigger, a JSON value valid under its schema, and its `end`,
then it is free again. Compiled as llguidance does it (`StructTag.to_grammar`): a lazy lexeme per
trigger, so free text ends at the trigger's first occurrence. A trigger that is one of the
tokenizer's special tokens (`<|python_tag|>`) is matched as that token, as the model emits it;
any other trigger (`<function=`) as text, wherever the tokens split it.

Each begin belongs to the shortest trigger that starts it: that is the one that fires first. A
trigger that no begin gets would never be enforced, so it is an error, as is a structure no
trigger starts (vLLM ignores the first and rejects the second).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIELD = "structured_outputs.structural_tag"
_KEYS = {"type", "structures", "triggers"}
_STRUCTURE_KEYS = {"begin", "schema", "end"}


@dataclass(frozen=True)
class Structure:
    trigger: str
    begin: str
    schema: dict[str, Any]
    end: str


def parse(value: object) -> tuple[Structure, ...]:
    """The structures of a tag (a dict or its JSON text). Raises ValueError naming the field."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{FIELD} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{FIELD} must be an object {{type, structures, triggers}}")
    _no_unknown(value, _KEYS, "")
    if value.get("type", "structural_tag") != "structural_tag":
        raise ValueError(f"{FIELD}: type must be 'structural_tag', got {value.get('type')!r}")
    triggers = value.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"{FIELD}: triggers must be a non-empty list of non-empty strings")
    items = value.get("structures")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{FIELD}: structures must be a non-empty list of {{begin, schema, end}} objects")
    structures = tuple(_structure(i, item, triggers) for i, item in enumerate(items))
    used = {s.trigger for s in structures}
    for i, t in enumerate(triggers):
        if t not in used:
            raise ValueError(
                f"{FIELD}: triggers[{i}] {t!r} begins no structure (or a shorter trigger fires "
                "first), so it would not be enforced"
            )
    return structures


def _structure(i: int, item: object, triggers: list[str]) -> Structure:
    where = f"structures[{i}]"
    if not isinstance(item, dict):
        raise ValueError(f"{FIELD}: {where} must be an object {{begin, schema, end}}")
    _no_unknown(item, _STRUCTURE_KEYS, where + ".")
    begin, schema, end = item.get("begin"), item.get("schema"), item.get("end")
    if not isinstance(begin, str) or not begin:
        raise ValueError(f"{FIELD}: {where}.begin must be a non-empty string")
    if not isinstance(end, str):
        raise ValueError(f"{FIELD}: {where}.end must be a string")
    if not isinstance(schema, dict):
        raise ValueError(f"{FIELD}: {where}.schema must be a JSON schema (an object)")
    starts = [t for t in triggers if begin.startswith(t)]
    if not starts:
        raise ValueError(f"{FIELD}: {where}.begin {begin!r} starts with none of the triggers {triggers}")
    return Structure(min(starts, key=len), begin, schema, end)


def _no_unknown(d: dict[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"{FIELD}: {prefix}{unknown[0]} is not a field (allowed: {', '.join(sorted(allowed))})"
        )


def key(structures: tuple[Structure, ...]) -> str:
    """The tag as canonical text (a cache key); schema key order kept, as it orders the JSON."""
    return json.dumps([[s.trigger, s.begin, s.schema, s.end] for s in structures], ensure_ascii=False)


def to_lark(
    structures: tuple[Structure, ...],
    special_tokens: Mapping[str, int] | None = None,
    defaults: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    """The Lark grammar (llguidance's dialect). `special_tokens`: the tokenizer's, name -> id;
    `defaults` / `overrides`: "x-guidance" options below / above each schema's own, as
    `LLMatcher.grammar_from_json_schema` takes them."""
    special = special_tokens or {}
    tags = " | ".join(f"tag_{i}" for i in range(len(structures)))
    lines = ["%llguidance {}", f"start: ({tags})* tag_end", "tag_end: TAG_TEXT", r"TAG_TEXT: /(.|\n)*/"]
    for i, s in enumerate(structures):
        schema = json.dumps(_with_options(s.schema, defaults, overrides), ensure_ascii=False)
        body = f"{_lit(s.begin[len(s.trigger) :])} %json {schema} {_lit(s.end)}"
        if s.trigger in special:
            lines.append(f"tag_{i}: TAG_TEXT <[{special[s.trigger]}]> {body}")
        else:
            lines.append(f"tag_{i}_trig[lazy]: TAG_TEXT {_lit(s.trigger)}")
            lines.append(f"tag_{i}: tag_{i}_trig {body}")
    return "\n".join(lines) + "\n"


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if text else ""


def _with_options(
    schema: dict[str, Any], defaults: dict[str, Any] | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    if not defaults and not overrides:
        return schema
    own = schema.get("x-guidance")
    options = {**(defaults or {}), **(own if isinstance(own, dict) else {}), **(overrides or {})}
    return {**schema, "x-guidance": {k: v for k, v in options.items() if v is not None}}


def schema_error(structures: tuple[Structure, ...]) -> str:
    """llguidance's complaint about the first schema it cannot compile, located
    (`structures[1].schema: ...`), or ''."""
    import llguidance

    for i, s in enumerate(structures):
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(s.schema)  # type: ignore[arg-type]
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        except ValueError as e:
            is_error, messages = True, [str(e)]
        if is_error:
            return f"structures[{i}].schema: {messages[0] if messages else 'invalid'}"
    return ""
