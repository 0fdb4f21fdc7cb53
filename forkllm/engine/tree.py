"""The generation tree's operations: the one API every tree policy (scaling strategies, threads,
tools) uses to change the engine's live sequences.

`TreeOps`: fork / pause / resume / prune / extend on the engine's live sequences. A fork shares
every page of its parent (copy-on-write on the partial last page), so n samples, beams and
particles cost one prefill. `extend` appends tokens nobody sampled (a tool's result) to a paused
sequence: resumed, it computes only them, as one chunk after the KV it has, and samples after
them. A policy may also park its sequences when they stop by themselves (`park_on_stop`: an
assistant message that ended with tool calls waits for their results, pages kept). Threads add
`spawn` (children with their own prompts), `truncate`, `join_pages` (kv/concat.py) and
`conclude` (a subtask's conclusion moved in with re-rotated keys).

A policy's view of its request and the driver that calls it after every step live in
engine/policy.py.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.events import TreeEvents
from forkllm.engine.sampler import derive_seed
from forkllm.engine.scheduler import Scheduler
from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.kv.concat import JoinBranch, PageJoin, join_pages
from forkllm.kv.manager import KVCacheManager, PageCopy
from forkllm.structured.state import GrammarState

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

StepHook = Callable[["LLMEngine"], None]
# Asked when one of a request's sequences stops by itself (EOS, a stop token or string, its grammar
# complete: finish_reason "stop"; or its length limit: "length"): True parks it (paused, pages
# kept) instead of finishing it.
StopGate = Callable[[Sequence], bool]
# Spawned children's seeds: derive_seed(parent's seed, SPAWN_SEED_BASE + k) for its k-th child, an
# index range no request's samples reach.
SPAWN_SEED_BASE = 1 << 32


class TreeOps:
    """Tree operations over the engine's registry of live sequences (`seqs`, by id)."""

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, seqs: dict[str, Sequence]) -> None:
        self.kv, self.scheduler, self.seqs = kv, scheduler, seqs
        self.num_forks = 0
        self.num_prunes = 0
        self.stop_gates: dict[str, StopGate] = {}  # by request id (see park_on_stop)
        self.events = TreeEvents(kv.pool)  # watched requests' operations (engine/events.py)
        # Set by the engine: copy pages now (copy-on-write) and move slots' KV with re-rotated keys.
        self.copy_pages: Callable[[list[PageCopy]], None] | None = None
        self.move_kv: Callable[[list[int], list[int], list[int]], None] | None = None

    def fork(self, parent: Sequence, k: int, seeds: list[int] | None = None) -> list[Sequence]:
        """k children of a live sequence, scheduled right after it; each samples with its own seed
        (default: derived from the request's seed and the child's index)."""
        if parent.finished or self.seqs.get(parent.seq_id) is not parent:
            raise ValueError(f"no live sequence {parent.seq_id!r} to fork")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if seeds is not None and len(seeds) != k:
            raise ValueError(f"got {len(seeds)} seeds for {k} children")
        return self._spawn(parent, parent, k, seeds)

    def fork_from_anchor(self, anchor: Sequence, k: int) -> list[Sequence]:
        """k deferred samples of an n > 1 request, forked from its anchor (see `hold`): the same
        indices, seeds and pages as if forked when the prompt was done."""
        assert anchor.parent is not None and anchor.status is SequenceStatus.PAUSED
        return self._spawn(anchor, anchor.parent, k, None)

    def _spawn(self, source: Sequence, parent: Sequence, k: int, seeds: list[int] | None) -> list[Sequence]:
        req = source.request
        kids: list[Sequence] = []
        for j in range(k):
            idx = len(req.seqs)
            seed = seeds[j] if seeds is not None else derive_seed(req.base_seed, idx)
            child = self._copy(source, f"{req.request_id}:{idx}", idx, seed, parent)
            req.seqs.append(child)
            self.seqs[child.seq_id] = child
            self.scheduler.add_running(child, after=source if j == 0 else kids[-1])
            kids.append(child)
            self.events.emit("fork", child, parent=parent.seq_id, start=child.num_output_tokens)
        self.num_forks += k
        return kids

    def hold(self, seq: Sequence) -> Sequence:
        """An anchor: a paused copy of `seq` sharing its pages, outside its request's samples and
        the live registry (never scheduled, never output); deferred samples fork from it."""
        return self._copy(seq, f"{seq.seq_id}:anchor", -1, seq.seed, seq, SequenceStatus.PAUSED)

    def _copy(
        self,
        source: Sequence,
        seq_id: str,
        index: int,
        seed: int,
        parent: Sequence,
        status: SequenceStatus = SequenceStatus.WAITING,
    ) -> Sequence:
        """A new sequence continuing from `source`: its tokens and sampling state (its grammar
        state copied, so the two diverge independently), its pages shared (copy-on-write)."""
        return Sequence(
            seq_id=seq_id,
            request=source.request,
            index=index,
            token_ids=list(source.token_ids),
            num_prompt_tokens=source.num_prompt_tokens,
            seed=seed,
            detok=source.detok.copy(),
            num_computed_tokens=source.num_computed_tokens,
            block_table=self.kv.share(source.block_table),
            cache_nodes=list(source.cache_nodes),
            num_reused_tokens=source.num_reused_tokens,
            num_output_at_fork=source.num_output_tokens,
            cumulative_logprob=source.cumulative_logprob,
            logprobs=None if source.logprobs is None else list(source.logprobs),
            parent=parent,
            status=status,
            grammar=None if source.grammar is None else source.grammar.fork(),
            # a page-joined or concluded context's KV layout (and its not being cacheable) goes too
            position_shift=source.position_shift,
            kv_holes=list(source.kv_holes),
            kv_moved=source.kv_moved,
        )

    def release(self, anchor: Sequence) -> None:
        """Drop an anchor's pages."""
        self.scheduler.finish(anchor)

    def pause(self, seq: Sequence) -> None:
        """Stop generating for a sequence but keep its pages (to fork or prune it later)."""
        if seq.finished:
            raise ValueError(f"no live sequence {seq.seq_id!r} to pause")
        if seq.status is not SequenceStatus.PAUSED:
            self.scheduler.pause(seq)
            self.events.emit("pause", seq)

    def resume(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.PAUSED:
            raise ValueError(f"no paused sequence {seq.seq_id!r} to resume")
        self.scheduler.resume(seq)
        self.events.emit("resume", seq)

    def prune(self, seq: Sequence) -> None:
        """Finish a sequence now (finish_reason "pruned") and release the pages only it held."""
        if seq.finished:
            raise ValueError(f"no live sequence {seq.seq_id!r} to prune")
        seq.finish_reason = "pruned"
        self.finish(seq)
        self.num_prunes += 1

    def finish(self, seq: Sequence) -> None:
        """End a sequence and release its pages; one that stopped by itself (finish_reason
        "stop") is parked instead when its request's stop gate says so (see park_on_stop)."""
        gate = self.stop_gates.get(seq.request.request_id)
        parkable = seq.finish_reason in ("stop", "length")
        if gate is not None and parkable and not seq.finished and gate(seq):
            self.scheduler.pause(seq)
            self.events.emit("pause", seq, reason="parked")
            return
        kind = "prune" if seq.finish_reason == "pruned" else "finish"
        self.events.emit(kind, seq, reason=seq.finish_reason)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)

    def park_on_stop(self, request_id: str, gate: StopGate | None) -> None:
        """When a sequence of the request stops by itself, ask `gate(seq)`: True parks it (PAUSED,
        pages kept, finish_reason still "stop") for its policy to `extend` and `resume` or `end`.
        None removes the gate."""
        if gate is None:
            self.stop_gates.pop(request_id, None)
        else:
            self.stop_gates[request_id] = gate

    def extend(self, seq: Sequence, token_ids: Seq[int], grammar: GrammarState | None = None) -> None:
        """Append tokens that were not sampled (a tool's result, the next turn's header) to a
        paused sequence. Its KV stays: resumed, it computes the tokens it had not computed (the
        last sampled one) plus these, as one chunk, and samples after them. They are output
        tokens by position but carry no logprobs and add no text (the detokenizer starts after
        them); `grammar` is the state of what the sequence samples next (None: unconstrained)."""
        if seq.status is not SequenceStatus.PAUSED or self.seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"no paused sequence {seq.seq_id!r} to extend")
        if not token_ids:
            raise ValueError("extend needs at least one token")
        seq.token_ids.extend(token_ids)
        n = seq.num_tokens
        detok = IncrementalDetokenizer.for_prompt(n)
        detok.text = seq.detok.text
        seq.detok = detok
        seq.finish_reason = seq.stop_reason = None
        seq.grammar = grammar
        self.events.emit("extend", seq, data={"added": len(token_ids)})

    # ---- threads: spawn / truncate / join by page ------------------------------------------------
    def spawn(
        self, parent: Sequence, suffixes: Seq[Seq[int]], token_limits: Seq[int | None] | None = None
    ) -> list[Sequence]:
        """One child per suffix, each continuing from the parent's pages with its own tokens
        appended (APR's spawn): scheduled at once, each computes only its suffix, then samples.
        The parent must have every token computed (see `truncate`); `token_limits` bound each
        child's total tokens (its thread's max_tokens). Each child's seed derives from the
        parent's (see `Sequence.spawned`): n thread trees in one request sample as each would
        alone."""
        if parent.finished or self.seqs.get(parent.seq_id) is not parent:
            raise ValueError(f"no live sequence {parent.seq_id!r} to spawn from")
        if parent.num_computed_tokens != parent.num_tokens:
            raise ValueError(f"sequence {parent.seq_id!r} has tokens not computed yet: truncate it first")
        if not suffixes or any(not s for s in suffixes):
            raise ValueError("spawn needs at least one child, each with at least one token")
        k = parent.spawned
        seeds = [derive_seed(parent.seed, SPAWN_SEED_BASE + k + j) for j in range(len(suffixes))]
        parent.spawned += len(suffixes)
        kids = self._spawn(parent, parent, len(suffixes), seeds)
        for child, suffix, limit in zip(kids, suffixes, token_limits or [None] * len(kids)):
            child.token_ids.extend(suffix)
            child.detok = IncrementalDetokenizer.for_prompt(child.num_tokens)
            child.token_limit = limit
            child.grammar = None
        return kids

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Drop a paused sequence's tokens past `num_tokens` (a sampled token a thread does not
        keep) and the pages past them."""
        if seq.status is not SequenceStatus.PAUSED or self.seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"no paused sequence {seq.seq_id!r} to truncate")
        if not seq.num_reused_tokens <= num_tokens <= seq.num_tokens:
            raise ValueError(f"cannot truncate {seq.seq_id!r} to {num_tokens} of {seq.num_tokens} tokens")
        n_out = max(0, num_tokens - seq.num_prompt_tokens)
        del seq.token_ids[num_tokens:]
        if seq.logprobs is not None:
            del seq.logprobs[n_out:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
        self.kv.trim(seq.block_table, num_tokens)
        del seq.cache_nodes[num_tokens // self.kv.block_size :]
        seq.detok = IncrementalDetokenizer.for_prompt(num_tokens)
        seq.grammar = None
        seq.finish_reason = seq.stop_reason = None

    def join_pages(self, parent: Sequence, children: Seq[Sequence]) -> PageJoin:
        """kv_concat: the paused parent takes its children's pages after its own (kv.concat) and
        their tokens; each child gives what it computed (a last sampled token, never computed, is
        not part of the join) and ends. No page is copied; positions as written."""
        if parent.status is not SequenceStatus.PAUSED or parent.num_computed_tokens != parent.num_tokens:
            raise ValueError(f"sequence {parent.seq_id!r} must be paused with every token computed to join")
        base = parent.num_tokens
        for c in children:
            if c.finished or self.seqs.get(c.seq_id) is not c or c.parent is not parent:
                raise ValueError(f"{c.seq_id!r} is not a live child of {parent.seq_id!r}")
            if c.num_computed_tokens < base or c.token_ids[:base] != parent.token_ids:
                raise ValueError(f"{c.seq_id!r} does not continue {parent.seq_id!r}")
        branch = lambda s: JoinBranch(  # noqa: E731
            s.block_table, s.num_computed_tokens, s.kv_holes, s.num_computed_tokens - s.position_shift
        )
        plan = join_pages(branch(parent), [branch(c) for c in children], self.kv.block_size)
        tokens = list(parent.token_ids) + [0] * (plan.num_slots - base)
        for c, (start, n) in zip(children, plan.regions):
            self.events.emit("join", c, parent=parent.seq_id)
            tokens[start : start + n] = c.token_ids[base : base + n]
            c.block_table = []  # its references moved to the parent or are in plan.released
            c.cache_nodes = []
            self.end(c, c.finish_reason or "stop")
        self.kv.pool.decref(plan.released)
        parent.block_table = plan.block_table
        parent.token_ids = tokens
        parent.num_computed_tokens = plan.num_slots
        parent.kv_holes = plan.holes
        parent.position_shift = plan.position_shift
        parent.detok = IncrementalDetokenizer.for_prompt(plan.num_slots)
        return plan

    def conclude(self, parent: Sequence, child: Sequence, keep: Seq[tuple[int, int]]) -> int:
        """Subtask pruning (TIMRUN): the paused parent takes the child's tokens in the slot ranges
        `keep` (its prompt and conclusion, say) after its own, their KV moved into the parent's
        pages with keys re-rotated to the parent's next positions (the positions the child's
        working tokens had are reused); the child ends and its pages go back. Returns the tokens
        taken. Nothing is recomputed."""
        if parent.status is not SequenceStatus.PAUSED or parent.num_computed_tokens != parent.num_tokens:
            raise ValueError(
                f"sequence {parent.seq_id!r} must be paused with every token computed to conclude"
            )
        base = parent.num_tokens
        if child.finished or self.seqs.get(child.seq_id) is not child or child.parent is not parent:
            raise ValueError(f"{child.seq_id!r} is not a live child of {parent.seq_id!r}")
        if any(not base <= a <= b <= child.num_computed_tokens for a, b in keep):
            raise ValueError(
                f"keep ranges {list(keep)} are not within {child.seq_id!r}'s own computed tokens"
            )
        assert self.copy_pages is not None and self.move_kv is not None, "the engine sets the KV movers"
        src_pos = [j for a, b in keep for j in range(a, b)]
        n = len(src_pos)
        copies: list[PageCopy] = []
        if not self.kv.allocate(parent.block_table, base + n, base, copies):
            raise RuntimeError("the KV cache has no pages for the concluded thread")
        self.copy_pages(copies)
        bs = self.kv.block_size
        slot = lambda table, j: table[j // bs] * bs + j % bs  # noqa: E731
        src = [slot(child.block_table, j) for j in src_pos]
        dst = [slot(parent.block_table, base + i) for i in range(n)]
        delta = [
            (base + i - parent.position_shift) - (j - child.position_shift) for i, j in enumerate(src_pos)
        ]
        self.move_kv(src, dst, delta)
        parent.token_ids.extend(child.token_ids[j] for j in src_pos)
        parent.num_computed_tokens = parent.num_tokens
        parent.kv_moved = True
        parent.detok = IncrementalDetokenizer.for_prompt(parent.num_tokens)
        self.events.emit("join", child, parent=parent.seq_id, data={"kept": n})
        self.end(child, child.finish_reason or "stop")
        return n

    def end(self, seq: Sequence, reason: str) -> None:
        """Finish a live or parked sequence now with `reason` ("stop", "length", ...)."""
        if seq.finished:
            raise ValueError(f"no live sequence {seq.seq_id!r} to end")
        seq.finish_reason = reason
        self.events.emit("finish", seq, reason=reason)
        self.scheduler.finish(seq)  # not self.finish: no stop gate asked
        self.seqs.pop(seq.seq_id, None)
