"""Threads the model opens with its own tags, detected in the step loop (no client loop).

Multiverse's format: the context writes

    <Parallel>
    <Goal>
    <Outline>1: ...</Outline>
    <Outline>2: ...</Outline>
    </Goal>

and stops there (`</Goal>` is a stop string of the tree's request: the engine parks the context).
The policy reads the outlines and spawns one path per outline (`\\n<Path>\\n1:` ...), each
continuing from the context's pages. A path ends at its own `</Path>` (a stop string) or at its
max_tokens (then `\\n</Path>` is appended for it). When every path has ended, the context joins
them (kv_concat or reprefill), `\\n<Conclusion>\\n` is appended and it goes on; it may open
another `<Parallel>` block later (up to `max_blocks`; one more ends the answer).

ThreadWeaver's format is the same machine with other tags (`PROTOCOL_TAGS`): `<Outlines>` ...
`</Outlines>` lists the outlines, each thread is `<Thread>\n1: ... </Thread>`, and the join is
followed by `\n</Parallel>\n`.

A parked sequence's last token (the `>` of its closing tag, or its last sampled token) has no KV
yet: before a spawn or a join the sequence settles (one more step computes it; the token sampled
then is dropped), so every tag is in the joined context.

The 135M default model does not write such blocks by itself: `outline` forces the first one (a
regex on the context's output: the model writes it token by token, and the same detection runs).

`Protocol("apr")` is APR's spawn/join calls, a different machine (threads/apr.py, AprPolicy) over
the same spec: `outline` forces its first call, `max_paths` / `max_blocks` bound children and
calls, it joins by reprefill of the children's returned messages (`returns` says how a message is
taken from a child's output).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence as EngineSequence
from forkllm.engine.sequence import SequenceStatus
from forkllm.structured.params import StructuredOutputsParams
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.result import ThreadEvent, ThreadInfo, ThreadResult
from forkllm.threads.spec import JOINS, TreeSpec

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Tags:
    """A protocol's tags: the block opens with `open` and `outlines_open`, lists `<Outline>`s,
    closes them with `outlines_end` (where the context stops and paths are spawned); a path is
    `path_open ... path_end`; after the join comes `after_join`."""

    open: str
    outlines_open: str
    outlines_end: str
    path_open: str
    path_end: str
    after_join: str


PROTOCOL_TAGS = {
    "multiverse": Tags("<Parallel>", "<Goal>", "</Goal>", "<Path>", "</Path>", "\n<Conclusion>\n"),
    "threadweaver": Tags(
        "<Parallel>", "<Outlines>", "</Outlines>", "<Thread>", "</Thread>", "\n</Parallel>\n"
    ),
}
# "apr": APR's spawn/join calls (threads/apr.py), a different machine over the same spec
PROTOCOLS = (*PROTOCOL_TAGS, "apr")
RETURNS = ("goal", "text")  # apr: how a child's returned message is taken from its output
_OUTLINE = re.compile(r"<Outline>\s*(?:(\d+)\s*:)?\s*(.*?)\s*</Outline>", re.S)


@dataclass(frozen=True)
class Protocol(TreeSpec):
    name: str
    join: str = ""  # "" is the protocol's own: kv_concat (Multiverse's), reprefill (APR's)
    max_tokens: int = 128  # each path's own tokens
    final_max_tokens: int = 256  # the context's tokens after each join (and before the first block)
    outline: Sequence[str] = ()  # forces the first block with these outlines
    max_paths: int = 8  # outlines of one block beyond this are not spawned (an error)
    max_blocks: int = 4  # <Parallel> blocks of one answer; opening one more ends it ("stop")
    returns: str = "goal"  # apr: a child's message: "goal" (APR's Countdown rule) or "text" (all of it)

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"Protocol: unknown protocol {self.name!r}; known: {', '.join(PROTOCOLS)}")
        if not self.join:
            object.__setattr__(self, "join", "reprefill" if self.name == "apr" else "kv_concat")
        if self.returns not in RETURNS:
            raise ValueError(f"Protocol.returns: {self.returns!r} is not one of {', '.join(RETURNS)}")
        if self.name == "apr":
            if self.join != "reprefill":
                raise ValueError(
                    "Protocol.join: apr joins by computing the children's returned messages "
                    f"(reprefill); {self.join!r} does not apply"
                )
            for i, o in enumerate(self.outline):
                if not o.strip() or "\n" in o:
                    raise ValueError(
                        f"Protocol.outline: item {i} is not one non-empty line (an apr child's input)"
                    )
        if self.join not in JOINS:
            raise ValueError(f"Protocol.join: {self.join!r} is not one of {', '.join(JOINS)}")
        for name in ("max_tokens", "final_max_tokens", "max_paths", "max_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.outline) > self.max_paths:
            raise ValueError(
                f"Protocol.outline: {len(self.outline)} paths exceed max_paths ({self.max_paths})"
            )

    @property
    def tags(self) -> Tags:
        return PROTOCOL_TAGS[self.name]

    def forced_opening(self) -> str:
        t = self.tags
        items = "".join(f"<Outline>{i}: {o}</Outline>\n" for i, o in enumerate(self.outline, 1))
        return f"{t.open}\n{t.outlines_open}\n{items}{t.outlines_end}"


@dataclass(eq=False)
class _Path:
    info: ThreadInfo
    seq: EngineSequence
    gen_start: int
    state: str = "running"  # running -> settling -> parked


@dataclass(eq=False)
class _Context:
    seq: EngineSequence
    state: str = "free"  # free -> settling -> waiting -> free ... -> done
    blocks: int = 0
    outlines: list[tuple[str, str]] = field(default_factory=list)
    paths: list[_Path] = field(default_factory=list)
    gen_start: int = 0
    sampled: int = 0


class ProtocolPolicy(ThreadTreePolicy):
    """Runs Multiverse-tagged generation from a prompt; `result()` is a ThreadResult."""

    def __init__(
        self,
        spec: Protocol,
        params: SamplingParams | None = None,
        on_event: Callable[[ThreadEvent], None] | None = None,
    ) -> None:
        if spec.name not in PROTOCOL_TAGS:
            raise ValueError(f"ProtocolPolicy runs tagged blocks; {spec.name!r} has its own policy")
        super().__init__(params, on_event)
        self.spec = spec
        self.ctx: _Context | None = None
        self.critical = 0

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        forced = self.spec.forced_opening() if self.spec.outline else None
        params = self.params.clone(
            stop=[self.spec.tags.outlines_end, self.spec.tags.path_end],
            include_stop_str_in_output=True,
            structured=StructuredOutputsParams(regex=re.escape(forced)) if forced else None,
        )
        seq = self._begin(engine, prompt_ids, params)
        self.ctx = _Context(seq, gen_start=len(prompt_ids))
        seq.token_limit = (
            len(prompt_ids) + self.spec.final_max_tokens + (len(self._encode(forced)) if forced else 0)
        )
        self._prompt_computed(len(prompt_ids))
        self.threads.append(ThreadInfo(0, None, question))
        self._park_on_stop(self._park)

    def _park(self, seq: EngineSequence) -> bool:
        ctx = self.ctx
        assert ctx is not None
        if seq is not ctx.seq:
            return True  # every path waits for its join
        # the context parks to open a block, and while settling; otherwise its answer ends
        opens = seq.stop_reason == self.spec.tags.outlines_end
        return ctx.state == "settling" or (opens and ctx.blocks < self.spec.max_blocks)

    def _settle(self, seq: EngineSequence, extra: list[int]) -> None:
        """Have a parked sequence compute its last token (and `extra`) in one more step; the
        token it samples then is dropped when it parks again."""
        assert self.tree is not None
        seq.grammar = None
        if extra:
            self.tree.extend(seq, extra)
            self.prefill_tokens += len(extra)
        seq.token_limit = seq.num_tokens + 1
        self.tree.resume(seq)

    def on_step(self, engine: LLMEngine) -> None:
        ctx, tree = self.ctx, self.tree
        assert ctx is not None and tree is not None
        self._measure()
        seq = ctx.seq
        for p in ctx.paths:
            if p.state == "running":
                self.log.delta(p.info.id, p.seq.text)
            if p.seq.status is not SequenceStatus.PAUSED:
                continue
            if p.state == "running":
                sampled = p.seq.num_tokens - p.gen_start
                p.info.generated_tokens, p.info.text, p.info.finish_reason = (
                    sampled,
                    p.seq.text,
                    p.seq.finish_reason,
                )
                self.generated_tokens += sampled
                self.log.emit("end", p.info.id, tokens=sampled)
                end = self.spec.tags.path_end
                self._settle(p.seq, [] if p.seq.stop_reason == end else self._encode(f"\n{end}"))
                p.state = "settling"
            elif p.state == "settling":
                engine.tree.truncate(p.seq, p.seq.num_tokens - 1)
                p.state = "parked"
        if ctx.state == "free":
            self.log.delta(0, seq.text)
            if seq.finished:
                self._finish()
            elif seq.status is SequenceStatus.PAUSED:  # stopped at </Goal>
                ctx.sampled += seq.num_tokens - ctx.gen_start
                text = seq.text
                opening = self.spec.tags.open
                block = text[text.rfind(opening) :] if opening in text else text
                ctx.outlines = [
                    (m.group(1) or str(i), m.group(2)) for i, m in enumerate(_OUTLINE.finditer(block), 1)
                ]
                if len(ctx.outlines) > self.spec.max_paths:
                    raise ValueError(
                        f"the model opened {len(ctx.outlines)} paths; max_paths is {self.spec.max_paths}"
                    )
                ctx.blocks += 1
                ctx.state = "settling"
                self._settle(seq, [])
        elif ctx.state == "settling" and seq.status is SequenceStatus.PAUSED:
            engine.tree.truncate(seq, seq.num_tokens - 1)
            self._spawn(ctx)
        elif ctx.state == "waiting" and all(p.state == "parked" for p in ctx.paths):
            self._join(ctx)

    def _spawn(self, ctx: _Context) -> None:
        engine, tree = self.engine, self.tree
        assert engine is not None and tree is not None
        if not ctx.outlines:  # a block without outlines: nothing to run in parallel
            self._continue(ctx, [])
            return
        suffixes = [self._encode(f"\n{self.spec.tags.path_open}\n{num}:") for num, _ in ctx.outlines]
        limits = [ctx.seq.num_tokens + len(s) + self.spec.max_tokens + 1 for s in suffixes]
        kids = engine.tree.spawn(ctx.seq, suffixes, limits)
        tree.forks += len(kids)
        ctx.paths = []
        for (num, text), kid, ids in zip(ctx.outlines, kids, suffixes):
            info = ThreadInfo(len(self.threads), 0, f"{num}: {text}")
            self.threads.append(info)
            self.threads[0].children.append(info.id)
            ctx.paths.append(_Path(info, kid, kid.num_tokens))
            self.prefill_tokens += len(ids)
        ctx.state = "waiting"
        self.log.emit("spawn", 0, [p.info.id for p in ctx.paths])

    def _join(self, ctx: _Context) -> None:
        engine = self.engine
        assert engine is not None
        kids = [p.seq for p in ctx.paths]
        base = ctx.seq.num_tokens
        if self.spec.join == "kv_concat":
            engine.tree.join_pages(ctx.seq, kids)
            joined: list[int] = []
        else:
            joined = [t for k in kids for t in k.token_ids[base : k.num_computed_tokens]]
            for k in kids:
                engine.tree.end(k, k.finish_reason or "stop")
        self.critical += max(p.info.generated_tokens for p in ctx.paths)
        self.log.restart(0)
        self._continue(ctx, joined)
        self.log.emit(
            "join", 0, [p.info.id for p in ctx.paths], join=self.spec.join, tokens=ctx.seq.num_tokens
        )

    def _continue(self, ctx: _Context, joined: list[int]) -> None:
        assert self.tree is not None
        extra = joined + self._encode(self.spec.tags.after_join)
        self.tree.extend(ctx.seq, extra)
        self.prefill_tokens += len(extra)
        ctx.gen_start = ctx.seq.num_tokens
        ctx.seq.token_limit = ctx.seq.num_tokens + self.spec.final_max_tokens
        ctx.state = "free"
        self.tree.resume(ctx.seq)

    def _finish(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        seq = ctx.seq
        self._finished(seq)
        ctx.sampled += seq.num_tokens - ctx.gen_start
        self.threads[0].generated_tokens = ctx.sampled
        self.threads[0].text, self.threads[0].finish_reason = seq.text, seq.finish_reason
        self.generated_tokens += ctx.sampled
        self.critical += ctx.sampled
        ctx.state = "done"
        self.log.emit("end", 0, tokens=ctx.sampled)

    def result(self) -> ThreadResult:
        assert self.ctx is not None
        seq = self.ctx.seq
        answer = seq.token_ids[self.ctx.gen_start :]
        return self._result(self.spec.join, self.critical, seq.finish_reason, token_ids=answer)
