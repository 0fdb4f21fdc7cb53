"""The tool-call formats, by the names `--tool-call-parser` takes (vLLM's)."""

from __future__ import annotations

from forkllm.tools.formats.base import ToolFormat
from forkllm.tools.formats.hermes import Hermes
from forkllm.tools.formats.llama3_json import Llama3Json
from forkllm.tools.formats.pythonic import Pythonic

FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3Json(), Pythonic())}
DEFAULT_FORMAT = "hermes"


def get_format(name: str) -> ToolFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r}; expected one of {', '.join(FORMATS)}") from None


__all__ = ["DEFAULT_FORMAT", "FORMATS", "ToolFormat", "get_format"]
