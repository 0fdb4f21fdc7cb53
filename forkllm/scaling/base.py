"""What every scaling strategy shares: the Policy base class (engine/policy.py's TreePolicy
protocol, run by the engine's one policy driver after every step, so a strategy's samples are
stepped in the same batch as everything else), candidates and votes.

A policy's view of its tree (`TreeRun`: live / paused / finished sequences, tokens generated, the
exact token budget) live in engine/policy.py, the tree operations in engine/tree.py.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkllm.engine.events import TreeWatcher
from forkllm.engine.llm_engine import LLMEngine
from forkllm.engine.policy import TreeRun, run_policies
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence
from forkllm.scaling.scorers import ScoreJob

if TYPE_CHECKING:
    from forkllm.scaling.threaded import TreeCandidates

__all__ = ["Candidate", "Policy", "ScaleResult", "TreeRun", "mean_logprob", "run_policies", "votes_for"]


@dataclass
class Candidate:
    seq_id: str
    text: str
    answer: str | None
    score: float | None
    num_tokens: int  # output tokens of its text (forked-from ancestors' tokens included)
    finish_reason: str | None
    mean_logprob: float | None = None

    @classmethod
    def of(cls, seq: Sequence, answer: str | None, score: float | None = None) -> Candidate:
        """The one way a sequence becomes a candidate (every strategy's result uses it)."""
        return cls(
            seq.seq_id, seq.text, answer, score, seq.num_output_tokens, seq.finish_reason, mean_logprob(seq)
        )


@dataclass
class ScaleResult:
    strategy: str
    answer: str | None
    text: str  # the chosen candidate's text
    votes: dict[str, float]
    candidates: list[Candidate]
    tokens_generated: int
    seconds: float
    forks: int = 0
    prunes: int = 0
    chosen: str | None = None  # the chosen candidate's sequence id
    extra: dict[str, Any] = field(default_factory=dict)


def mean_logprob(seq: Sequence) -> float | None:
    n = seq.num_output_tokens
    return seq.cumulative_logprob / n if seq.logprobs is not None and n else None


class Policy(ABC):
    """A strategy (a TreePolicy): `start` creates the tree, `on_step` runs after every engine
    step (engine/policy.py's driver calls it), `advance` is what each strategy decides there."""

    name = "policy"

    def __init__(
        self,
        temperature: float = 0.8,
        max_tokens: int = 256,
        seed: int = 0,
        budget: int | None = None,
        top_p: float = 1.0,
    ) -> None:
        self.temperature, self.top_p, self.max_tokens, self.seed = temperature, top_p, max_tokens, seed
        self.budget = budget  # total generated tokens of the whole tree, or None
        self.tree: TreeRun | None = None
        self.job: ScoreJob | None = None  # scoring in flight (a judge's requests), if any
        self.done = False
        self.t0 = 0.0
        self.question = ""
        self.watch: TreeWatcher | None = None  # reports the tree's operations (engine/events.py)
        self.trees: TreeCandidates | None = None  # candidates are thread trees (scaling/threaded.py)

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str = "") -> None:
        self.t0 = time.perf_counter()
        self.question = question
        if self.trees is not None:
            self.tree = self.trees.start(engine, prompt_ids, question, self.watch)
            return
        self.tree = TreeRun(engine, prompt_ids, self.sampling_params(), self.budget_tokens(), self.watch)

    def on_step(self, engine: LLMEngine) -> None:
        if self.done:
            return
        try:
            self.advance()
        except BaseException:
            self.finish()
            raise
        if self.done:
            self.finish()

    def finish(self) -> None:
        """Done: give up samples not forked yet and prune whatever still runs (the tree's
        finished sequences stay for the result)."""
        self.done = True
        tree = self.tree
        if tree is not None:
            tree.drop_pending()
            for s in tree.live() + tree.paused():
                tree.prune(s)

    def stop(self) -> None:
        """Stop now (the caller went away or the run failed): abort the tree as a whole, scoring
        requests in flight included."""
        if self.job is not None:
            self.job.cancel()
        if not self.done:
            self.finish()
        if self.tree is not None:
            self.tree.abort()

    @abstractmethod
    def sampling_params(self) -> SamplingParams: ...

    def _params(self, n: int, logprobs: bool) -> SamplingParams:
        """The tree's sampling: n first samples with the policy's shared sampling fields."""
        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
            logprobs=0 if logprobs else None,
        )

    def budget_tokens(self) -> int | None:
        return self.budget

    @abstractmethod
    def advance(self) -> None:
        """Look at the tree after a step, apply fork/prune/pause; set self.done when finished."""

    @abstractmethod
    def result(self) -> ScaleResult: ...

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def votes_for(cands: list[Candidate], weights: list[float] | None = None) -> dict[str, float]:
    votes: dict[str, float] = {}
    for i, c in enumerate(cands):
        if c.answer is not None:
            votes[c.answer] = votes.get(c.answer, 0.0) + (1.0 if weights is None else weights[i])
    return dict(sorted(votes.items(), key=lambda kv: -kv[1]))
