"""StructuredOutputsParams: which grammar a request's output must follow (vLLM's field names).

Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag` is set.
`json` is a JSON schema (a dict or its JSON text); `grammar` is a Lark grammar as llguidance reads
it (it may embed JSON schemas with `%json {...}`, which is how tool calls are forced);
`json_object` asks for any JSON object (OpenAI's `response_format: {"type": "json_object"}`);
`structural_tag` is free text in which each trigger starts a JSON-constrained structure
(structural_tag.py; a dict or its JSON text)."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from forkllm.structured import structural_tag
from forkllm.structured.structural_tag import Structure

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: dict[str, Any] | str | None = None
    # JSON (and a structural tag's JSON): no whitespace between tokens outside strings (fewer
    # tokens, as vLLM's flag).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(set_kinds) or 'none'}"
            )
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty string")
        if self.structural_tag is not None:
            self.structures()  # raises ValueError naming the field

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def schema(self) -> dict[str, Any] | bool | None:
        """The JSON schema as an object (None unless kind is json)."""
        if self.json is None:
            return None
        return _json.loads(self.json) if isinstance(self.json, str) else self.json

    def structures(self) -> tuple[Structure, ...]:
        """The structural tag's structures, checked (empty unless kind is structural_tag)."""
        return () if self.structural_tag is None else structural_tag.parse(self.structural_tag)
