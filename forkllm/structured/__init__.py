"""Structured output: grammars (JSON schema, regex, choice, Lark, structural tags) that constrain
sampling.

- `params.py`: what a request asks for (`StructuredOutputsParams`, vLLM's field names).
- `structural_tag.py`: vLLM's structural tags (free text, JSON after each trigger) as Lark.
- `backend.py`: `GrammarCompiler`, one per engine: llguidance grammars from specs, validated at
  request creation (ValueError naming the field), cached.
- `state.py`: `GrammarState`, one per sequence: forks with it, advances by its tokens.
- `mask.py`: the batch's token bitmasks, filled per sequence and applied to the logits at once.

The engine imports this package; it imports nothing above it."""

from forkllm.structured.backend import GrammarCompiler
from forkllm.structured.params import StructuredOutputsParams
from forkllm.structured.state import GrammarState, GrammarViolation

__all__ = ["GrammarCompiler", "GrammarState", "GrammarViolation", "StructuredOutputsParams"]
