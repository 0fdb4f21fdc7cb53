"""Turning what a caller sent into a Request: prompt validation and tokenization.

Pure with respect to engine state (it reads only the tokenizer and the model's limits), so the
async engine runs it on the caller's thread and hands the engine a ready Request. The request's
seed, when the caller gave none, is drawn later on the engine's thread (`LLMEngine.add_prepared`),
so unseeded requests do not depend on how callers' threads interleave. A structured request's
grammar is compiled and validated here too (a bad schema is a ValueError naming the field before
the engine sees the request), and its root sequence gets its grammar state.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from typing import Any

from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.outputs import RequestMetrics
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Request, Sequence
from forkllm.structured.backend import GrammarCompiler
from forkllm.structured.state import GrammarState
from forkllm.tokenizer import Tokenizer

PromptInput = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        max_model_len: int,
        eos_token_ids: Seq[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._ids = itertools.count()  # itertools.count is atomic under the GIL
        # Grammars of structured requests (its vocabulary is built on the first such request).
        self.grammars: GrammarCompiler | None = None
        if tokenizer is not None:
            eos = list(eos_token_ids)
            if not eos and tokenizer.eos_token_id is not None:
                eos = [tokenizer.eos_token_id]
            self.grammars = GrammarCompiler(tokenizer, eos)

    def grammar_state(self, params: SamplingParams) -> GrammarState | None:
        """The initial grammar state of a request's output (None when unconstrained); raises
        ValueError naming the field when the grammar library cannot use the spec."""
        if params.structured is None:
            return None
        if self.grammars is None:
            raise ValueError("structured_outputs needs a tokenizer; this engine was loaded without one")
        return self.grammars.new_state(params.structured)

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Text, token ids or {"prompt": ...} / {"prompt_token_ids": [...]} -> (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self.check_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass prompts as token id lists")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self.check_ids(list(prompt))
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for vocab_size {self.vocab_size}")
        return ids

    def make_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> Request:
        """Validate and tokenize into a Request with its first sequence (seeds still unset)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.vocab_size)  # logit_bias ids index the logits
        if params.threads is not None:
            raise ValueError(
                "SamplingParams.threads: a thread tree runs through LLM.generate / LLM.chat / "
                "LLM.threads (or the threads extension of the chat route), not as a plain request"
            )
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        grammar = self.grammar_state(params)
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "no room left to generate; shorten the prompt"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, text, ids, params, RequestMetrics(arrival_time or time.time()), priority=priority)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        # n samples = one sequence; when its prompt is done it forks n - 1 children that share
        # the prompt's pages, and all n sample from the same logits (the prompt is prefilled once).
        req.pending_samples = params.n - 1
        req.seqs.append(
            Sequence(
                seq_id=rid,
                request=req,
                index=0,
                token_ids=list(ids),
                num_prompt_tokens=len(ids),
                seed=0,  # set with the request's seed on the engine's thread
                detok=IncrementalDetokenizer.for_prompt(len(ids)),
                logprobs=[] if params.logprobs is not None else None,
                grammar=grammar,
            )
        )
        return req
