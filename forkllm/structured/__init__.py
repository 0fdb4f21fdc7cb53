"""Structured output: grammars (JSON schema, regex, choice, Lark) that constrain sampling.

`params.py` is what a request asks for; the grammar backend (llguidance) and the per-sequence
matcher state live beside it. The engine imports this package; it imports nothing above it."""

from forkllm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
