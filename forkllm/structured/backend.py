"""Grammar compilation with llguidance: StructuredOutputsParams -> a validated grammar, cached.

One `GrammarCompiler` per engine. Its llguidance tokenizer (the vocabulary as byte strings, built
from the Rust tokenizer's JSON, ~0.2-0.4 s) is made on the first structured request, not at
start-up. A compiled grammar keeps a template matcher in its initial state; a new request's
`GrammarState` is a deep copy of it (~13 us) instead of a fresh compile (~1 ms). Compiled
grammars are kept in a bounded LRU keyed by the request's spec, so a schema sent again costs
nothing. Everything here is thread-safe: requests are made off the engine's thread.

Why llguidance (measured on this CPU, SmolLM2's 49,152-token vocabulary, a nested JSON schema):
no per-schema compile (xgrammar: ~6 ms per schema before the first mask), 0.06 ms per mask,
Lark grammars with embedded JSON schemas (`%json {...}`: how tool calls are forced), and no
dependencies of its own.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance

from forkllm.structured import structural_tag
from forkllm.structured.params import StructuredOutputsParams
from forkllm.structured.state import GrammarState

DEFAULT_CACHE_SIZE = 256
# JSON whitespace between tokens: at most 20 characters per gap (a newline and 2-space indents 9
# deep). Unbounded, a small model at temperature 1.0 sometimes pads a gap with newlines until
# max_tokens (3 of 200 samples of the 135M model, tests/test_structured.py's schema). A schema's
# own "x-guidance" options override this; disable_any_whitespace allows none.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"


class TokenizerLike(Protocol):
    """What the compiler needs of forkllm's Tokenizer: the Rust tokenizer and the vocabulary size."""

    @property
    def backend(self) -> Any: ...
    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str
    grammar: str  # llguidance's grammar text (a JSON envelope around a schema, Lark or regex)
    template: llguidance.LLMatcher  # the initial state; never advanced, only copied


def _spec_key(spec: StructuredOutputsParams) -> tuple[str, str, bool]:
    """The cache key: what the grammar depends on. A JSON schema keeps its key order (it orders
    the generated object's keys), so two schemas differing only in order are two grammars."""
    kind = spec.kind
    if kind == "json":
        text = spec.json if isinstance(spec.json, str) else json.dumps(spec.json, ensure_ascii=False)
    elif kind == "choice":
        text = json.dumps(spec.choice, ensure_ascii=False)
    elif kind == "json_object":
        text = ""
    elif kind == "structural_tag":
        text = structural_tag.key(spec.structures())
    else:
        text = str(getattr(spec, kind))
    return kind, text, spec.disable_any_whitespace


def grammar_text(spec: StructuredOutputsParams, special_tokens: Mapping[str, int] | None = None) -> str:
    """llguidance's grammar for a spec (not validated yet). Raises ValueError naming the field.
    `special_tokens` (name -> id): a structural tag's triggers among them match as the token."""
    kind = spec.kind
    field = f"structured_outputs.{kind}"
    defaults: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE}
    overrides: dict[str, Any] | None = (
        {"whitespace_flexible": False, "whitespace_pattern": None} if spec.disable_any_whitespace else None
    )
    try:
        if kind in ("json", "json_object"):
            schema = spec.schema() if kind == "json" else {"type": "object"}
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema,  # type: ignore[arg-type]
                defaults=defaults,  # type: ignore[arg-type]
                overrides=overrides,  # type: ignore[arg-type]
            )
        if kind == "structural_tag":
            return structural_tag.to_lark(spec.structures(), special_tokens, defaults, overrides)
        if kind == "regex":
            assert spec.regex is not None
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            assert spec.choice is not None
            # Each choice a Lark string literal (JSON string syntax): an alternation of literals.
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            )
        assert spec.grammar is not None
        # Lark as llguidance reads it; a GBNF grammar (llama.cpp's, `root ::= ...`) is converted.
        from llguidance.gbnf_to_lark import any_to_lark

        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except ValueError as e:
        raise ValueError(f"{field}: {_clean(str(e))}") from None
    except Exception as e:  # the GBNF converter raises its own error types
        raise ValueError(f"{field}: {_clean(str(e)) or type(e).__name__}") from None


def _clean(message: str, kind: str = "") -> str:
    message = message.strip().removeprefix("Failed to convert the grammar from GBNF to Lark: ")
    if kind == "regex":  # llguidance wraps a regex in a one-rule Lark grammar: drop that excerpt
        message = re.sub(r"^at \d+\(\d+\): ", "", message)
        message = re.split(r"\n\s*\d+ \| start: ", message)[0].strip()
    return message


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; hands out per-sequence matcher states."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._special_tokens: dict[str, int] | None = None
        self._cache: OrderedDict[tuple[str, str, bool], CompiledGrammar] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def vocab_size(self) -> int:
        """Bits of a mask row: the tokenizer's vocabulary (the model's logits may be wider)."""
        return self._tokenizer.vocab_size

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, made once, on first use."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(),
                    n_vocab=self._tokenizer.vocab_size,
                    eos_token=self.eos_token_ids or None,
                )
            return self._ll_tokenizer

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's special tokens, name -> id (a structural tag's trigger may be one)."""
        if self._special_tokens is None:
            added_tokens = getattr(self._tokenizer.backend, "get_added_tokens_decoder", dict)
            self._special_tokens = {t.content: i for i, t in added_tokens().items() if t.special}
        return self._special_tokens

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The spec's grammar, validated against the vocabulary (cached). Raises ValueError
        naming the field (`structured_outputs.json: ...`) when llguidance cannot use it."""
        key = _spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        grammar = grammar_text(spec, self.special_tokens if spec.kind == "structural_tag" else None)
        # Grammar construction releases the GIL; concurrent first requests for one spec may both
        # build it (the result is the same), which beats holding the lock across a compile.
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            # A structural tag's error points into the generated grammar: name the schema instead.
            error = spec.kind == "structural_tag" and structural_tag.schema_error(spec.structures())
            raise ValueError(
                f"structured_outputs.{spec.kind}: {error or _clean(matcher.get_error(), spec.kind)}"
            )
        compiled = CompiledGrammar(spec.kind, grammar, matcher)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher for one sequence, in the grammar's initial state."""
        compiled = self.compile(spec)
        with self._lock:  # the template is shared: copy it under the lock
            matcher = compiled.template.deep_copy()
        return GrammarState(matcher, self.vocab_size)

    def __len__(self) -> int:
        return len(self._cache)
