"""n thread trees of one prompt (`LLM.threads(..., n=...)`, `SamplingParams(threads=..., n=...)`,
scaling strategies over thread trees): one request with n samples, as n > 1 sampling is. The
prompt is computed once; when it is done the engine forks n contexts that share its pages and
draw their first token from the same logits, each with the seed of its sample index
(`derive_seed(seed, i)`). Each context then runs its own tree policy (threads/base.py's host
mode). A thread's seed derives from its parent's (`TreeOps.spawn`), so tree i is the tree a lone
run seeded `derive_seed(seed, i)` gives (tree 0: the same seed), whatever the other trees do.

No tree acts before all n contexts exist: samples the batch had no room for yet (deferred by
the engine) would otherwise be forked after a tree's threads and take their indices; until then
the contexts that exist wait paused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forkllm.engine.events import TreeWatcher
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.policy import TreeRun
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.engine.tree import StopGate
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.result import ThreadCompletionOutput, ThreadResult

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine


class ThreadTrees:
    """A TreePolicy[list[ThreadResult]]: `policies[i]` runs tree i from sample i's context."""

    def __init__(self, policies: list[ThreadTreePolicy]) -> None:
        if not policies:
            raise ValueError("threads: n must be >= 1")
        self.policies = policies
        for p in policies:
            p.host = self
        self.gates: dict[int, StopGate] = {}  # by id(policy)
        self.tree: TreeRun | None = None
        self.watch: TreeWatcher | None = None
        self.done = False
        self.begun = [False] * len(policies)
        self.results: dict[int, ThreadResult] = {}  # trees done (finished())
        self.forked = False  # all n contexts exist
        self.held: list[Sequence] = []  # contexts paused while samples are deferred
        self.engine: LLMEngine | None = None
        self.prompt_ids: list[int] = []
        self.question = ""

    @property
    def n(self) -> int:
        return len(self.policies)

    # ---- TreePolicy ---------------------------------------------------------------------------
    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        limit = engine.config.max_num_seqs
        if self.n > limit:
            raise ValueError(f"threads: n={self.n} trees exceed max_num_seqs ({limit})")
        self.engine, self.prompt_ids, self.question = engine, prompt_ids, question
        self._begin(0)  # tree 0's policy adds the request (through bind)
        assert self.tree is not None
        self.tree.park_on_stop(self._gate)

    def on_step(self, engine: LLMEngine) -> None:
        tree = self.tree
        assert tree is not None
        if not self.forked:  # (started goes False again once a context drops its first token)
            if not tree.started:
                if tree.sampling:  # samples deferred: hold the contexts until every one is forked
                    for s in tree.live():
                        tree.pause(s)
                        self.held.append(s)
                return
            self.forked = True
        for s in self.held:
            if s.status is SequenceStatus.PAUSED:
                tree.resume(s)
        self.held.clear()
        for i, p in enumerate(self.policies):
            if not self.begun[i]:
                self._begin(i)
            if not p.done:
                p.on_step(engine)
        self.done = all(p.done for p in self.policies)

    def stop(self) -> None:
        if self.tree is not None:
            self.tree.park_on_stop(None)
            self.tree.abort()

    def result(self) -> list[ThreadResult]:
        done = self.finished()
        return [done[i] for i in range(self.n)]

    def finished(self) -> dict[int, ThreadResult]:
        """The results of the trees that are done so far, by tree index."""
        for i, p in enumerate(self.policies):
            if p.done and i not in self.results:
                self.results[i] = p.result()
        return self.results

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled so far by every tree."""
        return sum(p.generated_tokens for p in self.policies)

    def request_output(self, results: list[ThreadResult], prompt: str | None) -> RequestOutput:
        """The trees as LLM.generate's output: one ThreadCompletionOutput per tree."""
        assert self.tree is not None
        req = self.tree.request
        outputs: list = [
            ThreadCompletionOutput(i, r.text, list(r.token_ids), None, None, r.finish_reason, thread_tree=r)
            for i, r in enumerate(results)
        ]
        return RequestOutput(
            req.request_id,
            prompt,
            req.prompt_token_ids,
            None,
            outputs,
            True,
            req.metrics,
            req.seqs[0].num_reused_tokens,
        )

    # ---- what the trees ask of their host ------------------------------------------------------
    def bind(
        self, policy: ThreadTreePolicy, engine: LLMEngine, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[TreeRun, Sequence]:
        """The shared request (added by the first tree, with n samples) and this tree's context."""
        i = self._index(policy)
        if self.tree is None:
            self.tree = TreeRun(engine, prompt_ids, params.clone(n=self.n), None, self.watch)
        return self.tree, self.tree.seqs[i]

    def first(self, policy: ThreadTreePolicy) -> bool:
        return policy is self.policies[0]

    def seqs_of(self, policy: ThreadTreePolicy) -> list[Sequence]:
        """The request's sequences that belong to this tree (its context and its threads)."""
        assert self.tree is not None
        i = self._index(policy)
        return [s for s in self.tree.seqs if self._owner(s) == i]

    # ---- internals ----------------------------------------------------------------------------
    def _index(self, policy: ThreadTreePolicy) -> int:
        return next(i for i, p in enumerate(self.policies) if p is policy)

    def _begin(self, i: int) -> None:
        """Start tree i's policy (tree 0 adds the request; the others take their contexts)."""
        assert self.engine is not None
        self.begun[i] = True
        self.policies[i].start(self.engine, self.prompt_ids, self.question)

    def _owner(self, seq: Sequence) -> int | None:
        """Which tree a sequence belongs to: contexts are the request's samples 0..n-1, every
        thread descends from one."""
        s: Sequence | None = seq
        while s is not None and s.index >= self.n:
            s = s.parent
        return None if s is None or s.index < 0 else s.index

    def _gate(self, seq: Sequence) -> bool:
        """The request's stop gate: the owning tree's (begun now if its context's first token
        already stopped it, before the step hook could begin it)."""
        i = self._owner(seq)
        if i is None:
            return False
        if not self.begun[i]:
            self._begin(i)
        gate = self.gates.get(id(self.policies[i]))
        return gate is not None and gate(seq)
