"""Thread trees as a strategy's candidates: `SelfConsistency(n, threads=spec)` and
`BestOfN(n, threads=spec)` vote over / score n thread trees of the question instead of n plain
samples; each candidate's text is its tree's answer (the context's text after its last join) and
the trees' results go into the result's `extra["threads"]`.

The seam: `spec.trees(params)` (a forkllm.threads spec: Fanout, Subtasks, Protocol) gives n trees
of one prompt run as one policy (threads/trees.py: the prompt computed once, n contexts forked
from it, tree i seeded as sample i); this layer sees them only through `CandidateTrees` below
(scaling and threads are sibling layers). Only these two strategies take trees: a beam or a
particle is a partial sample resampled at step boundaries, which a tree's spawn / join phases
do not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from forkllm.engine.events import TreeWatcher
from forkllm.engine.policy import TreeRun
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence
from forkllm.scaling.base import Candidate

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine


class TreeAnswer(Protocol):
    """What a strategy reads of one finished tree (a forkllm.threads ThreadResult)."""

    @property
    def text(self) -> str: ...
    @property
    def generated_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> str | None: ...


class CandidateTrees(Protocol):
    """n trees of one prompt as one policy (forkllm.threads.trees.ThreadTrees): one request whose
    samples 0..n-1 are the trees' contexts."""

    watch: TreeWatcher | None
    tree: TreeRun | None
    done: bool

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None: ...
    def on_step(self, engine: LLMEngine) -> None: ...
    def finished(self) -> Mapping[int, TreeAnswer]: ...
    @property
    def n(self) -> int: ...
    @property
    def generated_tokens(self) -> int: ...


class TreeSpec(Protocol):
    def trees(self, params: SamplingParams) -> CandidateTrees: ...


def candidate_trees(spec: object, params: SamplingParams, strategy: str) -> CandidateTrees:
    """`params.n` trees of `spec`; ValueError naming `<strategy>.threads` for anything else."""
    make = getattr(spec, "trees", None)
    if make is None:
        raise ValueError(
            f"{strategy}.threads must be a Fanout, Subtasks or Protocol (forkllm.threads), "
            f"got {type(spec).__name__}"
        )
    trees: CandidateTrees = make(params)
    return trees


class TreeCandidates:
    """The trees a strategy owns (it is the policy the driver sees) and steps itself; each
    tree's answer is handed over once, as the tree finishes."""

    def __init__(self, spec: object, params: SamplingParams, strategy: str) -> None:
        self.trees = candidate_trees(spec, params, strategy)
        self.results: dict[int, TreeAnswer] = {}  # by tree index, as they finish
        self.index: dict[str, int] = {}  # a context's sequence id -> its tree

    def start(
        self, engine: LLMEngine, prompt_ids: list[int], question: str, watch: TreeWatcher | None
    ) -> TreeRun:
        self.trees.watch = watch
        self.trees.start(engine, prompt_ids, question)
        assert self.trees.tree is not None
        return self.trees.tree

    def step(self, engine: LLMEngine) -> list[tuple[int, TreeAnswer]]:
        """Step the trees; the answers of those that finished since the last call."""
        if not self.trees.done:
            self.trees.on_step(engine)
        new = [(i, r) for i, r in self.trees.finished().items() if i not in self.results]
        self.results.update(new)
        self.index.update((self.context(i).seq_id, i) for i, _ in new)
        return new

    @property
    def running(self) -> int:
        """Trees still running (each could still vote)."""
        return self.trees.n - len(self.results)

    @property
    def generated(self) -> int:
        return self.trees.generated_tokens

    def context(self, i: int) -> Sequence:
        """Tree i's context (its answer's sequence: what a scorer reads)."""
        assert self.trees.tree is not None
        return self.trees.tree.seqs[i]

    def candidate(self, seq_id: str, answer: str | None, score: float | None = None) -> Candidate:
        """The candidate of the tree whose context is `seq_id`."""
        r = self.results[self.index[seq_id]]
        return Candidate(seq_id, r.text, answer, score, r.generated_tokens, r.finish_reason, None)

    def extra(self, cands: list[Candidate]) -> dict[str, object]:
        """The trees' results in the candidates' order."""
        return {"threads": [self.results[self.index[c.seq_id]] for c in cands]}
