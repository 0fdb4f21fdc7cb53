"""Tools that run inside the engine: a tree policy that executes a sequence's tool calls while
everything else keeps decoding, then resumes the sequence from its own KV.

For every sequence of its request (n samples: each runs its own tools) `ToolPolicy`:
1. reads the text after every step with the incremental tool-call parser, and dispatches each call
   to the `ToolExecutor` the moment its markup closes (`</tool_call>`), while the sequence goes
   on decoding the message's next call (DTA-Llama / LLMCompiler: calls of one message overlap
   each other and the decoding);
2. when the message ends (EOS, or its grammar is complete) with calls in it, the engine parks the
   sequence instead of finishing it (`TreeRun.park_on_stop`): paused, pages resident;
3. once every call of the message has settled (returned, raised, timed out: an error is a result
   the model reads), appends the tool turn (`<|im_end|>\\n<|im_start|>tool\\n<tool_response>...`
   up to the next `<|im_start|>assistant\\n`, as the chat template renders it) with
   `TreeRun.extend` and resumes: only those tokens are computed, nothing before them;
4. reports, when asked (`on_event`, tools/events.py), each message's content, each call as it is
   dispatched, each result as it settles and each resume: what a streamed run sends;
5. ends after the first message without calls, at `max_rounds` messages with calls, at a stop
   string or stop token of the caller's, or when a message reaches max_tokens ("length").

`max_tokens` bounds each assistant message, as it bounds each request of a client loop
(`min_tokens` counts from the prompt, so it binds the first message only). The result is a RequestOutput whose outputs are `ToolCompletionOutput`s: the last assistant
message's text, tokens and logprobs, plus the calls made (name, arguments, result, timings) and
the messages of the whole exchange, OpenAI-shaped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkllm.engine.events import TreeWatcher
from forkllm.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from forkllm.engine.policy import TreeRun, driven_policies
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.structured.params import StructuredOutputsParams
from forkllm.tools.events import OnToolEvent, ToolEvent
from forkllm.tools.executor import ToolCallRecord, ToolExecutor
from forkllm.tools.parser import ToolCall, ToolCallParser
from forkllm.tools.runtime_schema import Tool
from forkllm.tools.turns import ToolTurnRenderer

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

# When every sequence in the engine waits on a tool, the policy waits this long at most for a call
# to settle before the engine loop goes round again (new requests wait no longer than this).
IDLE_WAIT_S = 0.02
# Round r's grammar (r = 0 for the first assistant message); None: unconstrained.
RoundGrammar = Callable[[int], StructuredOutputsParams | None]


@dataclass
class ToolCompletionOutput(CompletionOutput):
    """One sample of a tool-running chat: the final assistant message (text, token_ids, logprobs,
    finish_reason as a CompletionOutput) and what led there."""

    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    # The exchange after the prompt, OpenAI-shaped: assistant messages (with tool_calls), tool
    # messages (with tool_call_id), the final assistant message last.
    messages: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0  # assistant messages whose calls were run
    prefill_tokens: int = 0  # tool-turn tokens appended (computed on resume, nothing else)
    generated_tokens: int = 0  # tokens sampled over every assistant message


@dataclass
class _Message:
    """One assistant message of one sequence, as generated so far."""

    round: int
    token_start: int  # index in seq.token_ids of its first token
    text_start: int  # offset in seq.detok.text
    logprob_start: int  # index in seq.logprobs
    parser: ToolCallParser
    scanned: int = 0  # characters of its text fed to the parser
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    records: list[ToolCallRecord] = field(default_factory=list)


@dataclass
class _SeqState:
    message: _Message
    records: list[ToolCallRecord] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    prefill_tokens: int = 0
    output: ToolCompletionOutput | None = None
    reported: set[str] = field(default_factory=set)  # call ids whose results were reported


class ToolPolicy:
    """A TreePolicy: one chat request whose sequences run their tool calls in-engine (see the
    module docstring). `round_grammar(r)` may force the format of assistant message r."""

    def __init__(
        self,
        params: SamplingParams,
        tools: dict[str, Tool],
        executor: ToolExecutor,
        renderer: ToolTurnRenderer,
        max_rounds: int = 8,
        timeout: float | None = 60.0,
        round_grammar: RoundGrammar | None = None,
        prompt: str | None = None,
        on_event: OnToolEvent | None = None,
    ) -> None:
        if params.ignore_eos:
            raise ValueError(
                "ignore_eos cannot be used with run_tools: the end of a message is when its tools run"
            )
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs cannot be used with run_tools")
        if max_rounds < 0:
            raise ValueError(f"max_tool_rounds must be >= 0, got {max_rounds}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"tool_timeout must be > 0 seconds, got {timeout}")
        self.params, self.tools, self.executor, self.renderer = params, tools, executor, renderer
        self.max_rounds, self.timeout, self.round_grammar = max_rounds, timeout, round_grammar
        self.prompt = prompt
        self.done = False
        self.tree: TreeRun | None = None
        self.engine: LLMEngine | None = None
        self.states: dict[str, _SeqState] = {}
        self._seen_completions = 0
        self._call_ids = 0
        self.watch: TreeWatcher | None = None  # reports the tree's operations (engine/events.py)
        self.on_event = on_event  # reports content, calls, results and resumes (tools/events.py)

    # ---- TreePolicy ----------------------------------------------------------------------------
    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str = "") -> None:
        self.engine = engine
        changes: dict[str, Any] = {"max_tokens": None, "output_kind": RequestOutputKind.FINAL_ONLY}
        if self.round_grammar is not None:
            changes["structured"] = self.round_grammar(0)
        self.tree = TreeRun(engine, prompt_ids, self.params.clone(**changes), None, self.watch)
        self.tree.park_on_stop(self._park)

    def on_step(self, engine: LLMEngine) -> None:
        tree = self.tree
        if self.done or tree is None:
            return
        now = time.perf_counter()
        waiting = False
        for seq in list(tree.seqs):
            st = self._state(seq)
            if seq.finished:
                if st.output is None:
                    self._close(seq, st)
                continue
            self._scan(seq, st)
            if seq.status is SequenceStatus.PAUSED:  # parked at the end of a message with calls
                for r in st.message.records:
                    self.executor.expire(r, now)
            self._report_results(seq, st)
            if seq.status is SequenceStatus.PAUSED:
                if all(r.done for r in st.message.records):
                    self._resume(seq, st)
                else:
                    waiting = True
            elif self._message_tokens(seq, st) >= self._max_tokens():
                tree.end(seq, "length")
                self._close(seq, st)
        if tree.request.finished and all(s.output is not None for s in self.states.values()):
            self._finish()
            return
        if waiting and not engine.scheduler.has_unfinished() and self._first_tool_policy(engine):
            self._idle_wait(now)

    def stop(self) -> None:
        for st in self.states.values():
            for r in st.records:
                self.executor.cancel(r)
        if self.tree is not None:
            self.tree.park_on_stop(None)
            if not self.done:
                self.tree.abort()
        self.done = True

    def result(self) -> RequestOutput:
        tree = self.tree
        assert tree is not None
        req = tree.request
        outs = sorted(
            (st.output for st in self.states.values() if st.output is not None), key=lambda o: o.index
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=self.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=None,
            outputs=list(outs),
            finished=True,
            metrics=req.metrics,
            num_cached_tokens=req.seqs[0].num_reused_tokens if req.seqs else 0,
        )

    # ---- per sequence --------------------------------------------------------------------------
    def _state(self, seq: Sequence) -> _SeqState:
        st = self.states.get(seq.seq_id)
        if st is None:  # a root or an n > 1 sample (forked before its first message)
            st = _SeqState(self._new_message(seq, 0))
            self.states[seq.seq_id] = st
        return st

    def _new_message(self, seq: Sequence, round: int) -> _Message:
        # Any tool name is a call: one not registered gets an error result the model reads.
        parser = ToolCallParser(self.renderer.format, None, new_id=self._new_call_id)
        return _Message(
            round,
            seq.num_tokens if round else seq.num_prompt_tokens,
            len(seq.detok.text) if round else 0,
            len(seq.logprobs) if (round and seq.logprobs is not None) else 0,
            parser,
        )

    def _new_call_id(self) -> str:
        self._call_ids += 1
        return f"call_{self._call_ids}"

    def _scan(self, seq: Sequence, st: _SeqState) -> None:
        """Feed the message's new text to the parser; dispatch every call it completes."""
        msg = st.message
        text = seq.detok.text
        new = text[msg.text_start + msg.scanned :]
        if not new:
            return
        msg.scanned += len(new)
        delta = msg.parser.feed(new)
        self._add_content(seq, st, delta.content)
        for call in delta.calls:
            self._dispatch(seq, st, call)

    def _dispatch(self, seq: Sequence, st: _SeqState, call: ToolCall) -> None:
        msg = st.message
        msg.calls.append(call)
        if msg.round >= self.max_rounds:
            return  # its result could not be given back: not run
        args = call.arguments_dict()
        record = ToolCallRecord(call.id, call.name, args, msg.round, time.perf_counter())
        tool = self.tools.get(call.name)
        unknown = f"unknown tool {call.name!r}; the tools are: {', '.join(self.tools) or 'none'}"
        self.executor.submit(tool.fn if tool else None, record, self.timeout, unknown)
        msg.records.append(record)
        st.records.append(record)
        if self.on_event is not None:
            self.on_event(ToolEvent("call", seq.index, msg.round, call=call.as_openai()))

    def _add_content(self, seq: Sequence, st: _SeqState, text: str) -> None:
        if not text:
            return
        st.message.content += text
        if self.on_event is not None:
            self.on_event(ToolEvent("content", seq.index, st.message.round, text=text))

    def _report_results(self, seq: Sequence, st: _SeqState) -> None:
        """Report the calls that settled since the last step (streaming only)."""
        if self.on_event is None:
            return
        for r in st.message.records:
            if r.done and r.call_id not in st.reported:
                st.reported.add(r.call_id)
                self.on_event(ToolEvent("result", seq.index, r.round, call=r.as_dict()))

    def _park(self, seq: Sequence) -> bool:
        """The engine asks, as the sequence stops by itself: park it for its calls' results?"""
        if seq.finish_reason != "stop" or seq.stop_reason is not None:  # length, or the caller's stop
            return False
        st = self._state(seq)
        self._scan(seq, st)
        delta = st.message.parser.finish()  # the message is over: a call cut short still counts
        self._add_content(seq, st, delta.content)
        for call in delta.calls:
            self._dispatch(seq, st, call)
        return bool(st.message.records)

    def _resume(self, seq: Sequence, st: _SeqState) -> None:
        """All calls of the parked message settled: append the tool turn and go on."""
        tree, engine = self.tree, self.engine
        assert tree is not None and engine is not None
        msg = st.message
        self._record_message(seq, st, with_results=True)
        last = seq.token_ids[-1]
        eos_text = (
            engine.tokenizer.decode([last], False)
            if last in engine.eos_token_ids and engine.tokenizer
            else None
        )
        ids = self.renderer.tokens([r.result or "" for r in msg.records], eos_text)
        grammar = self._grammar(engine, msg.round + 1)
        try:
            tree.extend(seq, ids, grammar)
        except ValueError:  # the turn does not fit max_model_len
            tree.end(seq, "length")
            self._close(seq, st, recorded=True)
            return
        st.prefill_tokens += len(ids)
        st.message = self._new_message(seq, msg.round + 1)
        tree.resume(seq)
        if self.on_event is not None:
            self.on_event(ToolEvent("resume", seq.index, msg.round + 1, prefill_tokens=len(ids)))

    def _grammar(self, engine: LLMEngine, round: int) -> Any:
        """The grammar state of message `round` (the request's own grammar afresh, unless
        round_grammar says otherwise)."""
        spec = self.round_grammar(round) if self.round_grammar is not None else self.params.structured
        if spec is None:
            return None
        return engine.inputs.grammar_state(SamplingParams(structured=spec))

    def _record_message(self, seq: Sequence, st: _SeqState, with_results: bool) -> None:
        msg = st.message
        m: dict[str, Any] = {"role": "assistant", "content": msg.content or None}
        if msg.calls:
            m["tool_calls"] = [c.as_openai() for c in msg.calls]
        st.messages.append(m)
        if with_results:
            for r in msg.records:
                st.messages.append({"role": "tool", "tool_call_id": r.call_id, "content": r.result})

    def _close(self, seq: Sequence, st: _SeqState, recorded: bool = False) -> None:
        """The sequence is over: its last message is the output."""
        msg = st.message
        if not recorded:
            if seq.finish_reason != "abort":
                delta = msg.parser.finish()
                self._add_content(seq, st, delta.content)
                msg.calls += delta.calls
            self._record_message(seq, st, with_results=False)
        text = seq.detok.text[msg.text_start :]
        token_ids = seq.token_ids[msg.token_start :]
        lps: list[PositionLogprobs] | None = (
            None if seq.logprobs is None else seq.logprobs[msg.logprob_start :]
        )
        st.output = ToolCompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=None if lps is None else sum(p[t].logprob for p, t in zip(lps, token_ids)),
            logprobs=lps,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            tool_calls=list(st.records),
            messages=st.messages,
            rounds=msg.round,
            prefill_tokens=st.prefill_tokens,
            generated_tokens=seq.num_output_tokens - st.prefill_tokens,
        )

    def _message_tokens(self, seq: Sequence, st: _SeqState) -> int:
        return seq.num_tokens - st.message.token_start

    def _max_tokens(self) -> int:
        engine = self.engine
        assert engine is not None
        mt = self.params.max_tokens
        return mt if mt is not None else engine.max_model_len

    # ---- the policy as a whole -----------------------------------------------------------------
    def _finish(self) -> None:
        self.done = True
        if self.tree is not None:
            self.tree.park_on_stop(None)

    def _first_tool_policy(self, engine: LLMEngine) -> bool:
        """One tool policy per step waits for the executor (the first driven), not each."""
        for h in driven_policies(engine):
            if isinstance(h.policy, ToolPolicy) and not h.policy.done:
                return h.policy is self
        return True

    def _idle_wait(self, now: float) -> None:
        deadlines = [
            r.deadline for st in self.states.values() for r in st.message.records if not r.done and r.deadline
        ]
        wait = IDLE_WAIT_S if not deadlines else max(0.0, min(IDLE_WAIT_S, min(deadlines) - now))
        self._seen_completions = self.executor.wait_for_completion(self._seen_completions, wait)
