"""SamplingParams: what a request asks of the sampler and the stop checker (vLLM's field names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forkllm.structured.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
# top_k above this is refused: the sampler hands it to int64 tensors and C++ kernels, and any value
# at least the vocabulary size already means "every token".
MAX_TOP_K = 2**31 - 1
# OpenAI's range for a logit_bias value: -100 bans a token, +100 all but forces it.
MAX_LOGIT_BIAS = 100.0


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # token id -> bias added to that token's logit before any other processing (OpenAI's
    # logit_bias); checked against the vocabulary by `check_vocab`.
    logit_bias: dict[int, float] | None = None
    # A grammar the output must follow (JSON schema, regex, choice, Lark); None: unconstrained.
    structured: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # A thread tree spec (forkllm.threads: Fanout, MapReduce, Subtasks, Protocol): LLM.generate
    # and LLM.chat run each prompt as that tree (n trees for n > 1). Typed loosely because the
    # engine sits below forkllm.threads; the engine itself refuses it (it runs plain requests).
    threads: Any = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        self.stop_token_ids = list(self.stop_token_ids or [])

    def _validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{name} {msg}, got {getattr(self, name)!r}")

        def number(name: str) -> bool:
            """A real, finite number: NaN slips through every range comparison and an infinity
            turns the logits into NaN, so both are refused before any range check."""
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not number("temperature") or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not number("top_p") or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer up to {MAX_TOP_K}")
        if not number("min_p") or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not number("repetition_penalty") or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(name) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be at least 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of integers")
        self._validate_logit_bias()
        if self.structured is not None and not isinstance(self.structured, StructuredOutputsParams):
            raise bad("structured", "must be a StructuredOutputsParams")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        for token, value in bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {value!r} for token {token}"
                )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids this request names must exist in the model's vocabulary (logit_bias indexes
        the logits with them); raises ValueError naming the field."""
        for token in self.logit_bias or ():
            if token >= vocab_size:
                raise ValueError(f"logit_bias token id {token} is out of range for vocab_size {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: object) -> SamplingParams:
        from dataclasses import fields, replace

        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        kw.update(changes)
        return replace(self, **kw)
