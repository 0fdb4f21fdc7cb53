"""Draft-model proposer (`speculative="path/or/preset"`): a smaller model with the same tokenizer
drafts greedily, the target model verifies (the classic speculative decoding of Leviathan et al.
and Chen et al.).

The draft model runs in an engine of its own (`DraftEngine`: forkllm's LLMEngine, made by the
target engine), with its own paged KV and prefix cache. A draft is one ordinary greedy request
for `k` tokens whose prompt is the sequence's whole text: the draft engine's prefix cache holds
the full pages it computed for earlier drafts of the same text, so each draft computes only the
tokens since the last full page, then k - 1 decode steps. The drafts of one target step run as
one batch there. Nothing of a target request lives in the draft engine between steps except its
cached pages (evictable like any), so forks, prunes, preemption and aborts need no bookkeeping:
a forked sample's first draft finds its parent's pages in the cache.

Drafts are proposals only: verification (engine/spec/decoder.py) decides every token, so the
output is the same with any draft model, good or bad.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any, Protocol

from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.sequence import Request, Sequence


class DraftEngine(Protocol):
    """What the proposer needs of the draft model's engine (an LLMEngine)."""

    max_model_len: int

    def add_request(
        self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str: ...
    def step(self) -> list[Any]: ...
    def has_unfinished_requests(self) -> bool: ...


class DraftModelProposer:
    """Greedy drafts from a second model (see the module docstring)."""

    name = "draft"

    def __init__(self, engine: DraftEngine, draft_cost: float) -> None:
        self.engine = engine
        # A draft token costs about one decode step of the draft model: its weights over the
        # target's, as both steps are bound by reading the weights.
        self.draft_cost = draft_cost
        self._ids = itertools.count()

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        engine = self.engine
        if engine.has_unfinished_requests():  # only this proposer adds requests to it
            raise RuntimeError("the draft engine has requests of its own running")
        wanted: dict[str, int] = {}
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            k = min(k, engine.max_model_len - seq.num_tokens)
            if k <= 0:
                continue
            params = SamplingParams(temperature=0.0, max_tokens=k, output_kind=RequestOutputKind.FINAL_ONLY)
            rid = engine.add_request(
                {"prompt_token_ids": list(seq.token_ids)}, params, f"draft-{next(self._ids)}"
            )
            wanted[rid] = i
        drafts: list[list[int]] = [[] for _ in seqs]
        while engine.has_unfinished_requests():
            for out in engine.step():
                at = wanted.get(out.request_id)
                if at is not None and out.finished:
                    drafts[at] = list(out.outputs[0].token_ids)
        return drafts

    def drop(self, request: Request) -> None:
        pass  # nothing of a request outlives its step in the draft engine (but cached pages)

    def clear_history(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def check_same_vocabulary(target: Any, draft: Any, name: str) -> None:
    """A draft model must speak the target's tokens: the same vocabulary, id for id. `target`,
    `draft`: (vocab size, tokenizer or None) of each. Raises ValueError naming `speculative`."""
    (t_size, t_tok), (d_size, d_tok) = target, draft
    if t_size != d_size:
        raise ValueError(
            f"speculative: the draft model {name!r} has a vocabulary of {d_size} tokens, the model "
            f"{t_size}; a draft model needs the same tokenizer"
        )
    if t_tok is not None and d_tok is not None and _vocab(t_tok) != _vocab(d_tok):
        raise ValueError(
            f"speculative: the draft model {name!r} has another tokenizer than the model (same size, "
            "different tokens); a draft model needs the same tokenizer"
        )


def _vocab(tokenizer: Any) -> Seq[tuple[str, int]]:
    return sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items())
