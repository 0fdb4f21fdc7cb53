"""`Protocol("apr")`: APR's spawn/join calls (threads/apr_format.py) run in the step loop.

The context (thread 0) generates until it closes a spawn call: `<End Calling Sub Searches>` is a
stop string of the tree's request, so the engine parks it there. The policy parses the call and
cuts it out of the context (`TreeOps.truncate` to the last token before `<Calling Sub Searches>`;
text a token there held past that point is appended again): as in APR, the parent goes on
without its call. It then spawns one child per call line from the context's pages
(`TreeOps.spawn`, the child's input and a newline appended: only those are computed). A child
runs to its EOS or max_tokens and finishes, its pages given back at once: APR joins the
children's returned messages, not their traces, so nothing of a child's KV is kept. When every
child has finished, the results block (each child's message, or `No Solution`) is appended to the
context and computed (a reprefill of just that text) and the context goes on; it may call again
(up to `max_blocks` calls; one more ends the answer).

Where this differs from APR: its children start from their input alone (a fresh context is what
bounds its context length); here each continues the parent's context, sharing its pages. A
child's own spawn call is not run (it ends the child), as APR's released eval runs one level.

A malformed call (closed but never opened, a line that is not `<Start Sub Search i at level l>
input`, no child, more than `max_paths`) fails the tree with a ValueError saying which; every
page goes back. The 135M default model does not write calls itself: `outline=[...]` forces the
first one (a regex on the context's output; the model writes it token by token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence as EngineSequence
from forkllm.engine.sequence import SequenceStatus
from forkllm.structured.params import StructuredOutputsParams
from forkllm.threads.apr_format import (
    CALL_END,
    ChildCall,
    parse_call,
    results_block,
    returned_message,
    spawn_call,
)
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.protocols import Protocol
from forkllm.threads.result import ThreadEvent, ThreadInfo, ThreadResult

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine


@dataclass(eq=False)
class _Child:
    info: ThreadInfo
    call: ChildCall
    seq: EngineSequence
    gen_start: int
    done: bool = False


class AprPolicy(ThreadTreePolicy):
    """Runs APR spawn/join calls from a prompt; `result()` is a ThreadResult."""

    def __init__(
        self,
        spec: Protocol,
        params: SamplingParams | None = None,
        on_event: Callable[[ThreadEvent], None] | None = None,
    ) -> None:
        if spec.name != "apr":
            raise ValueError(f"AprPolicy runs Protocol('apr'), not {spec.name!r}")
        super().__init__(params, on_event)
        self.spec = spec
        self.ctx: EngineSequence | None = None
        self.state = "free"  # free -> waiting -> free ... -> done
        self.calls = self.gen_start = self.sampled = self.critical = 0
        self.kids: list[_Child] = []
        self.leftover = ""  # text before the call that the kept tokens do not hold

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        forced = spawn_call(self.spec.outline) if self.spec.outline else None
        params = self.params.clone(
            stop=[CALL_END],
            include_stop_str_in_output=True,
            structured=StructuredOutputsParams(regex=re.escape(forced)) if forced else None,
        )
        seq = self.ctx = self._begin(engine, prompt_ids, params)
        self.gen_start = len(prompt_ids)
        forced_len = len(self._encode(forced)) if forced else 0
        seq.token_limit = len(prompt_ids) + self.spec.final_max_tokens + forced_len
        self._prompt_computed(len(prompt_ids))
        self.threads.append(ThreadInfo(0, None, question))
        self._park_on_stop(self._park)

    def _park(self, seq: EngineSequence) -> bool:
        """A child finishes (its pages go back); the context parks at a call it may still make."""
        return seq is self.ctx and seq.stop_reason == CALL_END and self.calls < self.spec.max_blocks

    def on_step(self, engine: LLMEngine) -> None:
        ctx = self.ctx
        assert ctx is not None
        self._measure()
        for c in self.kids:
            if not c.done:
                self.log.delta(c.info.id, c.seq.text)
                if c.seq.finished:
                    self._child_done(c)
        if self.state == "free":
            self.log.delta(0, ctx.text)
            if ctx.finished:
                self._finish()
            elif ctx.status is SequenceStatus.PAUSED:  # closed a spawn call
                self._spawn()
        elif self.state == "waiting" and all(c.done for c in self.kids):
            self._join()

    def _cut(self, ids: list[int], before: str) -> int:
        """The most tokens of `ids` that decode to a prefix of `before` (the text up to the call);
        the rest of `before` becomes `leftover`."""
        assert self.engine is not None and self.engine.tokenizer is not None
        decode = self.engine.tokenizer.decode
        for k in range(len(ids), -1, -1):
            kept = decode(ids[:k])
            if before.startswith(kept):
                self.leftover = before[len(kept) :]
                return k
        raise AssertionError("unreachable: no tokens decode to the empty prefix")

    def _spawn(self) -> None:
        engine, tree, seq = self.engine, self.tree, self.ctx
        assert engine is not None and tree is not None and seq is not None
        assert engine.tokenizer is not None
        self.sampled += seq.num_tokens - self.gen_start
        out = seq.token_ids[self.gen_start :]
        text = engine.tokenizer.decode(out)
        pos, calls = parse_call(text)
        if len(calls) > self.spec.max_paths:
            raise ValueError(
                f"apr: the model spawned {len(calls)} children; max_paths is {self.spec.max_paths}"
            )
        engine.tree.truncate(seq, self.gen_start + self._cut(out, text[:pos]))
        self.calls += 1
        suffixes = [self._encode(f"{self.leftover}{c.input}\n") for c in calls]
        limits = [seq.num_tokens + len(s) + self.spec.max_tokens for s in suffixes]
        seqs = engine.tree.spawn(seq, suffixes, limits)
        tree.forks += len(seqs)
        self.kids = []
        for call, kid, ids in zip(calls, seqs, suffixes):
            info = ThreadInfo(len(self.threads), 0, call.input)
            self.threads.append(info)
            self.threads[0].children.append(info.id)
            self.kids.append(_Child(info, call, kid, kid.num_tokens))
            self.prefill_tokens += len(ids)
        self.state = "waiting"
        self.log.emit("spawn", 0, [c.info.id for c in self.kids])

    def _child_done(self, c: _Child) -> None:
        if c.seq.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"thread {c.info.id} ended: {c.seq.finish_reason} ({c.seq.stop_reason})")
        sampled = c.seq.num_tokens - c.gen_start
        c.info.generated_tokens, c.info.text, c.info.finish_reason = sampled, c.seq.text, c.seq.finish_reason
        self.generated_tokens += sampled
        c.done = True
        self.log.emit("end", c.info.id, tokens=sampled)

    def _join(self) -> None:
        tree, seq = self.tree, self.ctx
        assert tree is not None and seq is not None
        messages = [returned_message(c.info.text, self.spec.returns) for c in self.kids]
        joined = self._encode(self.leftover + results_block([c.call for c in self.kids], messages))
        tree.extend(seq, joined)
        self.prefill_tokens += len(joined)
        self.critical += max(c.info.generated_tokens for c in self.kids)
        self.gen_start = seq.num_tokens
        seq.token_limit = seq.num_tokens + self.spec.final_max_tokens
        self.state = "free"
        tree.resume(seq)
        self.log.restart(0)
        kids = [c.info.id for c in self.kids]
        self.log.emit("join", 0, kids, join="reprefill", tokens=seq.num_tokens)

    def _finish(self) -> None:
        seq = self.ctx
        assert seq is not None
        self._finished(seq)
        self.sampled += seq.num_tokens - self.gen_start
        info = self.threads[0]
        info.generated_tokens, info.text, info.finish_reason = self.sampled, seq.text, seq.finish_reason
        self.generated_tokens += self.sampled
        self.critical += self.sampled
        self.state = "done"
        self.log.emit("end", 0, tokens=self.sampled)

    def result(self) -> ThreadResult:
        assert self.ctx is not None
        return self._result(
            "reprefill", self.critical, self.ctx.finish_reason, token_ids=self.ctx.token_ids[self.gen_start :]
        )
