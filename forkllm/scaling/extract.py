"""Answer extractors: text -> answer string (or None when there is none)."""

from __future__ import annotations

import re
from collections.abc import Callable

Extractor = Callable[[str], str | None]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(s: str) -> str:
    """'1,234.50' -> '1234.5'; '42.0' -> '42'."""
    s = s.replace(",", "").strip()
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


def last_number(text: str) -> str | None:
    """The last number in the text (commas dropped, 42.0 -> 42)."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (balanced braces)."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            inner = text[i:j].strip()
            return normalize_number(inner) if _NUMBER.fullmatch(inner.replace(" ", "")) else inner
    return None


def regex(pattern: str, group: int = 1) -> Extractor:
    """The given group of the last match of `pattern`."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        return matches[-1].group(group).strip() if matches else None

    return extract


def by_name(name: str) -> Extractor:
    """'last_number', 'boxed' or 'regex:<pattern>' (for the CLI and the HTTP API)."""
    if name == "last_number":
        return last_number
    if name == "boxed":
        return boxed
    if name.startswith("regex:"):
        return regex(name[len("regex:") :])
    raise ValueError(f"extract must be 'last_number', 'boxed' or 'regex:<pattern>', got {name!r}")
