"""What a thread tree returns: the answer, every thread, and the events a page can draw."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from forkllm.engine.outputs import CompletionOutput


@dataclass
class ThreadEvent:
    """spawn (a context fans out), join (it takes its threads back), prune (a subtask concluded:
    its working tokens dropped), end (a thread or the context finished), and, only for a live
    listener, delta (text a thread wrote since its last delta). `t` is seconds since the tree
    started."""

    t: float
    event: str
    thread: int
    children: list[int] = field(default_factory=list)
    join: str | None = None
    tokens: int = 0  # join: tokens the context holds after it; end: tokens the thread generated
    text: str = ""  # delta: the new text


class EventLog:
    """A tree's events, kept for its result and handed, as they happen, to a listener (the
    server's SSE stream) on the engine's thread."""

    def __init__(self, on_event: Callable[[ThreadEvent], None] | None = None) -> None:
        self.events: list[ThreadEvent] = []
        self.on_event = on_event
        self.t0 = time.perf_counter()
        self.sent: dict[int, int] = {}  # thread -> characters of its text sent as deltas

    def t(self) -> float:
        return round(time.perf_counter() - self.t0, 4)

    def emit(self, event: str, thread: int, children: list[int] | None = None, **kw: Any) -> None:
        ev = ThreadEvent(self.t(), event, thread, children or [], **kw)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    def delta(self, thread: int, text: str) -> None:
        """Tell a live listener what a thread wrote since the last time (not kept)."""
        if self.on_event is None:
            return
        sent = self.sent.get(thread, 0)
        if len(text) > sent:
            self.sent[thread] = len(text)
            self.on_event(ThreadEvent(self.t(), "delta", thread, text=text[sent:]))

    def restart(self, thread: int) -> None:
        """The thread's text starts over (its sequence's text after a join)."""
        self.sent[thread] = 0


@dataclass
class ThreadInfo:
    """One thread (id 0 is the context): what it was told, what it wrote, its tokens."""

    id: int
    parent: int | None
    prompt: str
    text: str = ""
    generated_tokens: int = 0  # tokens it sampled (its own, not its children's)
    finish_reason: str | None = None
    children: list[int] = field(default_factory=list)


@dataclass
class ThreadResult:
    text: str  # what the context wrote after the last join
    threads: list[ThreadInfo]
    events: list[ThreadEvent]
    join: str
    prefill_tokens: int  # tokens computed without being sampled (prompt, thread prompts, rejoined text)
    generated_tokens: int  # tokens sampled by every thread and the context
    critical_path_tokens: int  # sampled tokens on the longest chain of sequential steps
    peak_kv_pages: int  # pages in use in the engine at the fullest step of this tree
    seconds: float
    finish_reason: str | None = None
    pages_after_subtasks: list[int] = field(default_factory=list)  # Subtasks: the context's pages
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens (as sampled)

    @property
    def tree(self) -> dict[str, Any]:
        """The thread tree as plain data (JSON-ready): threads and events."""
        return {
            "join": self.join,
            "threads": [asdict(t) for t in self.threads],
            "events": [asdict(e) for e in self.events],
        }


@dataclass
class ThreadCompletionOutput(CompletionOutput):
    """One sample of `LLM.generate(..., SamplingParams(threads=spec))`: the tree's answer as a
    CompletionOutput (text, its tokens, finish_reason; no logprobs) and the whole tree."""

    thread_tree: ThreadResult | None = None
