"""ThreadPolicy: a thread tree run inside the step loop (a TreePolicy, like the scaling strategies).

One request holds the whole tree. The context (thread 0) computes its prompt; the token it then
samples is dropped (`TreeOps.truncate`) and it spawns one child per thread prompt
(`TreeOps.spawn`: each child shares the context's pages and computes only its own prompt), then
pauses. Threads decode in the same batch as everything else; a thread that stops (EOS, stop
string, its max_tokens) is parked, pages kept. When every thread of a fan-out is parked the
context joins them (`kv_concat`: `TreeOps.join_pages`, or `reprefill`: their tokens appended and
computed again), appends `then` and goes on. A thread that is itself a fan-out does the same one
level down before it is parked for its own parent's join.

A thread's contribution to the join is what it computed: its prompt and its tokens, not the last
sampled one (an EOS, mostly; a thread cut by max_tokens keeps max_tokens tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence, SequenceStatus, SharedView
from forkllm.threads.base import ThreadTreePolicy
from forkllm.threads.result import ThreadEvent, ThreadInfo, ThreadResult
from forkllm.threads.spec import Fanout

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

DEFAULT_MAX_DEPTH = 4


@dataclass(eq=False)
class _Node:
    info: ThreadInfo
    spec: Fanout | None  # fans out after its prompt (None: a leaf thread)
    max_tokens: int
    seq: Sequence | None = None
    state: str = "prefix"  # prefix -> waiting -> running -> parked (threads) / done (context)
    prompt_end: int = 0  # tokens of its sequence once its prompt is in
    gen_start: int = 0  # where the tokens it samples in its last phase start
    children: list[_Node] = field(default_factory=list)
    critical: int = 0  # sampled tokens on its longest sequential chain


class ThreadPolicy(ThreadTreePolicy):
    """Runs one thread tree (a `Fanout`) from a prompt; `result()` is a ThreadResult."""

    def __init__(
        self,
        spec: Fanout,
        params: SamplingParams | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
        on_event: Callable[[ThreadEvent], None] | None = None,
    ) -> None:
        if not isinstance(spec, Fanout):
            raise TypeError(f"threads: expected a Fanout, got {type(spec).__name__}")
        if spec.depth > max_depth:
            raise ValueError(f"threads: the tree is {spec.depth} levels deep; max_depth is {max_depth}")
        super().__init__(params, on_event)
        self.spec = spec
        self.nodes: dict[str, _Node] = {}  # by sequence id
        self.root: _Node | None = None

    # ---- TreePolicy ---------------------------------------------------------------------------
    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        limit = engine.config.max_num_seqs
        if self.spec.num_threads > limit:
            raise ValueError(
                f"threads: {self.spec.num_threads} threads at once exceed max_num_seqs ({limit})"
            )
        context = self._begin(engine, prompt_ids, self.params)
        root = self._node(None, question, self.spec, self.spec.final_max_tokens)
        root.seq, root.prompt_end = context, len(prompt_ids)
        self.nodes[context.seq_id] = self.root = root
        self._park_on_stop(self._park)

    def on_step(self, engine: LLMEngine) -> None:
        assert self.root is not None and self.root.seq is not None
        self._measure()
        for node in list(self.nodes.values()):
            seq = node.seq
            assert seq is not None
            if node.state == "running":
                self.log.delta(node.info.id, seq.text)
            if seq.finished and node is not self.root and node.state != "joined":
                raise RuntimeError(f"thread {node.info.id} ended: {seq.finish_reason} ({seq.stop_reason})")
            if node.state == "prefix" and seq.num_tokens > node.prompt_end:
                self._fan_out(node)
            elif node.state == "waiting" and all(c.state == "parked" for c in node.children):
                self._join(node)
            elif node.state == "running" and seq.status is SequenceStatus.PAUSED:
                self._park_done(node)
            elif node.state == "running" and seq.finished:  # the context's answer
                self._finished(seq)
                self._park_done(node)
                self.log.emit("end", 0, tokens=node.info.generated_tokens)

    def result(self) -> ThreadResult:
        assert self.root is not None and self.root.seq is not None
        root = self.root.seq
        answer = root.token_ids[self.root.gen_start :]
        return self._result(self.spec.join, self.root.critical, root.finish_reason, token_ids=answer)

    # ---- the tree -----------------------------------------------------------------------------
    def _node(self, parent: _Node | None, prompt: str, spec: Fanout | None, max_tokens: int) -> _Node:
        info = ThreadInfo(len(self.threads), None if parent is None else parent.info.id, prompt)
        self.threads.append(info)
        if parent is not None:
            parent.info.children.append(info.id)
        return _Node(info, spec, max_tokens)

    def _park(self, seq: Sequence) -> bool:
        """Asked as a sequence stops by itself: every thread waits for its join; the context's
        answer ends the tree."""
        node = self.nodes.get(seq.seq_id)
        return node is not None and not (node is self.root and node.state == "running")

    def _fan_out(self, node: _Node) -> None:
        """Its prompt is computed (the token sampled after it is dropped): spawn its threads."""
        engine, seq, spec = self.engine, node.seq, node.spec
        assert engine is not None and seq is not None
        if node is self.root:
            self._prompt_computed(node.prompt_end - seq.num_reused_tokens)
        assert spec is not None, "a leaf thread is spawned running: it never fans out"
        if seq.status is not SequenceStatus.PAUSED:  # parked already when its first sample ended it
            engine.tree.pause(seq)
        engine.tree.truncate(seq, node.prompt_end)
        kids: list[_Node] = []
        suffixes: list[list[int]] = []
        limits: list[int | None] = []
        for p in spec.prompts:
            if isinstance(p, Fanout):
                kid = self._node(node, p.prefix, p, p.final_max_tokens)
                ids = self._encode(p.prefix)
                limits.append(seq.num_tokens + len(ids) + 1)  # it samples once, then fans out
            else:
                kid = self._node(node, p, None, spec.max_tokens)
                ids = self._encode(p)
                limits.append(seq.num_tokens + len(ids) + spec.max_tokens + 1)
            kids.append(kid)
            suffixes.append(ids)
        if spec.shared_cache and seq.kv_pinned:
            raise ValueError(
                "Fanout.shared_cache: the context's KV was joined or moved; workers need a plain one"
            )
        children = engine.tree.spawn(seq, suffixes, limits)
        if spec.shared_cache:
            view = SharedView(seq.num_tokens, children)
            for child in children:
                child.view = view
        assert self.tree is not None
        self.tree.forks += len(children)
        for kid, child, ids in zip(kids, children, suffixes):
            kid.seq, kid.prompt_end = child, child.num_tokens
            kid.gen_start = child.num_tokens
            kid.state = "prefix" if kid.spec is not None else "running"
            self.nodes[child.seq_id] = kid
            self.prefill_tokens += len(ids)
        node.children, node.state = kids, "waiting"
        self.log.emit("spawn", node.info.id, [k.info.id for k in kids])

    def _park_done(self, node: _Node) -> None:
        """A thread (or the context's answer) stopped: note what it wrote."""
        seq = node.seq
        assert seq is not None
        sampled = seq.num_tokens - node.gen_start
        node.info.generated_tokens += sampled
        node.info.text = seq.text
        node.info.finish_reason = seq.finish_reason
        node.critical = sampled + max((c.critical for c in node.children), default=0)
        self.generated_tokens += sampled
        node.state = "parked" if node is not self.root else "done"
        if node is not self.root:
            self.log.emit("end", node.info.id, tokens=sampled)

    def _join(self, node: _Node) -> None:
        engine, seq, spec = self.engine, node.seq, node.spec
        assert engine is not None and seq is not None and spec is not None and self.tree is not None
        kids: list[Sequence] = []
        for c in node.children:
            assert c.seq is not None
            kids.append(c.seq)
        base = seq.num_tokens
        then = self._encode(spec.then)
        if spec.join == "kv_concat":
            engine.tree.join_pages(seq, kids)
            extra = then
        else:
            joined = [t for k in kids for t in k.token_ids[base : k.num_computed_tokens]]
            for k in kids:
                engine.tree.end(k, k.finish_reason or "stop")
            extra = joined + then
        for c in node.children:
            c.state = "joined"
        self.tree.extend(seq, extra)
        self.prefill_tokens += len(extra)
        node.gen_start = seq.num_tokens
        seq.token_limit = seq.num_tokens + node.max_tokens + (node is not self.root)
        node.state = "running"
        self.tree.resume(seq)
        self.log.restart(node.info.id)
        kids_ids = [c.info.id for c in node.children]
        self.log.emit("join", node.info.id, kids_ids, join=spec.join, tokens=seq.num_tokens)
