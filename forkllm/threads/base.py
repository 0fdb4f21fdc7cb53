"""What the thread policies share: the request, the thread records, the event log, the counters
their ThreadResult reports, and how they start, stop and measure pages."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from forkllm.engine.events import TreeWatcher
from forkllm.engine.policy import TreeRun
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence
from forkllm.engine.tree import StopGate
from forkllm.threads.result import EventLog, ThreadEvent, ThreadInfo, ThreadResult

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine
    from forkllm.threads.trees import ThreadTrees


def tree_pages(seqs: list[Sequence]) -> int:
    """Distinct KV pages the live sequences of one tree hold."""
    return len({b for s in seqs if not s.finished for b in s.block_table})


class ThreadTreePolicy(ABC):
    """A TreePolicy[ThreadResult] skeleton: `_begin` adds the tree's one request, `_measure`
    runs first in every `on_step`, `_result` builds the answer's record.

    Under a `host` (threads/trees.py: n trees of one prompt) the request is the host's, shared
    by the n trees: `_begin` takes this tree's context from it, the stop gate goes to the host
    (which asks the tree that owns the stopping sequence), pages are measured over this tree's
    sequences, and only the first tree counts the prompt as computed."""

    def __init__(self, params: SamplingParams | None, on_event: Callable[[ThreadEvent], None] | None) -> None:
        self.params = params or SamplingParams(temperature=0.0)
        if self.params.n != 1:
            raise ValueError("threads: n must be 1 per tree (n trees: LLM.threads(..., n=...))")
        if self.params.threads is not None:  # the spec this policy runs; the engine refuses it
            self.params = self.params.clone(threads=None)
        self.host: ThreadTrees | None = None
        self.tree: TreeRun | None = None
        self.engine: LLMEngine | None = None
        self.threads: list[ThreadInfo] = []
        self.log = EventLog(on_event)
        self.watch: TreeWatcher | None = None  # reports the tree's operations (engine/events.py)
        self.prefill_tokens = self.generated_tokens = self.peak_pages = 0
        self.t0 = self.seconds = 0.0
        self.done = False

    @abstractmethod
    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None: ...

    @abstractmethod
    def on_step(self, engine: LLMEngine) -> None: ...

    @abstractmethod
    def result(self) -> ThreadResult: ...

    def _begin(self, engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Add the tree's request (its context is thread 0); returns the context's sequence."""
        if engine.tokenizer is None:
            raise ValueError("threads need a tokenizer (thread prompts are text)")
        self.engine, self.t0 = engine, time.perf_counter()
        self.log.t0 = self.t0
        params = params.clone(max_tokens=engine.max_model_len)
        if self.host is not None:
            self.tree, context = self.host.bind(self, engine, prompt_ids, params)
            return context
        self.tree = TreeRun(engine, prompt_ids, params, None, self.watch)
        return self.tree.seqs[0]

    def _park_on_stop(self, gate: StopGate) -> None:
        """Park this tree's sequences that stop by themselves when `gate(seq)` (TreeOps)."""
        if self.host is not None:
            self.host.gates[id(self)] = gate
        else:
            assert self.tree is not None
            self.tree.park_on_stop(gate)

    def _prompt_computed(self, tokens: int) -> None:
        """Count the prompt's computed tokens (once per request: not again for a host's trees
        after the first, which forked from it)."""
        if self.host is None or self.host.first(self):
            self.prefill_tokens += tokens

    def _measure(self) -> None:
        assert self.tree is not None
        seqs = self.tree.seqs if self.host is None else self.host.seqs_of(self)
        self.peak_pages = max(self.peak_pages, tree_pages(seqs))

    def _encode(self, text: str) -> list[int]:
        assert self.engine is not None and self.engine.tokenizer is not None
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def _finished(self, context: Sequence) -> None:
        """The context's answer ended: the tree is done (or failed, when it was aborted)."""
        if context.finish_reason == "abort":
            raise RuntimeError(f"thread tree aborted: {context.stop_reason or 'aborted'}")
        self.seconds = time.perf_counter() - self.t0
        self.done = True

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()
        elif self.tree is not None:
            self.tree.park_on_stop(None)
            self.tree.abort()

    def _result(
        self, join: str, critical: int, finish_reason: str | None, **extra: list[int]
    ) -> ThreadResult:
        return ThreadResult(
            text=self.threads[0].text,
            threads=self.threads,
            events=self.log.events,
            join=join,
            prefill_tokens=self.prefill_tokens,
            generated_tokens=self.generated_tokens,
            critical_path_tokens=critical,
            peak_kv_pages=self.peak_pages,
            seconds=self.seconds,
            finish_reason=finish_reason,
            **extra,
        )
