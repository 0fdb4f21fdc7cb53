"""The machinery every strategy shares: a policy drives one request's sequence tree from the
engine's step hook, so its samples are stepped in the same batch as everything else.

`TreeRun` is a policy's view of its tree: which sequences are live, paused or finished, how many
tokens they generated (a fork's inherited tokens are not counted again), tree operations, and the
token budget, enforced exactly by pruning before a step would overrun it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class Candidate:
    seq_id: str
    text: str
    answer: str | None
    score: float | None
    num_tokens: int
    finish_reason: str | None
    mean_logprob: float | None = None


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
    extra: dict[str, Any] = field(default_factory=dict)


class TreeRun:
    """One request's sequence tree as a policy sees it."""

    def __init__(
        self, engine: Any, prompt_ids: list[int], params: SamplingParams, budget: int | None
    ) -> None:
        self.engine = engine
        self.budget = budget
        params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
        if budget is not None and params.n > budget:
            raise ValueError(
                f"budget ({budget} tokens) is smaller than the {params.n} first tokens of n={params.n}"
            )
        rid = engine.add_request(prompt_ids, params)
        self.request: Request = engine.requests[rid]
        self.forks = params.n - 1  # the engine forks these at the first sample
        self.prunes = 0

    @property
    def seqs(self) -> list[Sequence]:
        return self.request.seqs

    def live(self) -> list[Sequence]:
        """Sequences that will generate in the next step (running or waiting)."""
        return [s for s in self.seqs if s.status in (SequenceStatus.RUNNING, SequenceStatus.WAITING)]

    def paused(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is SequenceStatus.PAUSED]

    def finished(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finished]

    @property
    def started(self) -> bool:
        """The prompt is done and the first tokens exist (n > 1 forks happen then)."""
        return self.request.pending_samples == 0 and self.seqs[0].num_output_tokens > 0

    @property
    def generated(self) -> int:
        return sum(s.num_output_tokens - s.num_output_at_fork for s in self.seqs)

    def fork(self, seq: Sequence, k: int, seeds: list[int] | None = None) -> list[Sequence]:
        ids = self.engine.fork(seq.seq_id, k, seeds)
        self.forks += k
        return [self.engine.seqs[i] for i in ids]

    def prune(self, seq: Sequence) -> None:
        if not seq.finished:
            self.engine.prune(seq.seq_id)
            self.prunes += 1

    def pause(self, seq: Sequence) -> None:
        if seq.status in (SequenceStatus.RUNNING, SequenceStatus.WAITING):
            self.engine.pause(seq.seq_id)

    def enforce_budget(self, priority: Callable[[Sequence], float] | None = None) -> bool:
        """Prune live sequences (lowest priority first) so that the next step cannot take the
        tree past its budget: each live sequence generates at most one token per step. Returns
        False once the budget is spent."""
        if self.budget is None:
            return True
        remaining = self.budget - self.generated
        live = self.live()
        if len(live) > remaining:
            keep = sorted(live, key=priority, reverse=True) if priority else live
            for s in keep[max(remaining, 0) :]:
                self.prune(s)
        return remaining > 0

    def abort(self) -> None:
        self.engine.abort_request(self.request.request_id)


def mean_logprob(seq: Sequence) -> float | None:
    n = seq.num_output_tokens
    return seq.cumulative_logprob / n if seq.logprobs is not None and n else None


class Policy(ABC):
    """A strategy: `start` creates the tree, `on_step` runs after every engine step."""

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
        self.done = False
        self.t0 = 0.0
        self.question = ""

    def start(self, engine: Any, prompt_ids: list[int], question: str = "") -> None:
        self.t0 = time.perf_counter()
        self.question = question
        self.tree = TreeRun(engine, prompt_ids, self.sampling_params(), self.budget_tokens())
        engine.step_hooks.append(self.on_step)

    def on_step(self, engine: Any) -> None:
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
        """Stop: prune whatever still runs and leave the engine's hooks."""
        self.done = True
        tree = self.tree
        if tree is not None:
            for s in tree.live() + tree.paused():
                tree.prune(s)
            if self.on_step in tree.engine.step_hooks:
                tree.engine.step_hooks.remove(self.on_step)

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


def run_policies(engine: Any, jobs: list[tuple[Policy, list[int], str]]) -> list[ScaleResult]:
    """Run policies to completion on a synchronous engine (they share every step's batch)."""
    for policy, ids, question in jobs:
        policy.start(engine, ids, question)
    try:
        while not all(p.done for p, _, _ in jobs):
            if not engine.has_unfinished_requests():
                for p, _, _ in jobs:  # nothing left to step: let every policy conclude
                    p.on_step(engine)
                if not all(p.done for p, _, _ in jobs):
                    raise RuntimeError("a scaling policy stalled with nothing to run")
                break
            engine.step()
    finally:
        for p, _, _ in jobs:
            if not p.done:
                p.finish()
                if p.tree is not None:
                    p.tree.abort()
    return [p.result() for p, _, _ in jobs]


def votes_for(cands: list[Candidate], weights: list[float] | None = None) -> dict[str, float]:
    votes: dict[str, float] = {}
    for i, c in enumerate(cands):
        if c.answer is not None:
            votes[c.answer] = votes.get(c.answer, 0.0) + (1.0 if weights is None else weights[i])
    return dict(sorted(votes.items(), key=lambda kv: -kv[1]))
