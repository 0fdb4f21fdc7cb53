"""The generation tree: the one API every tree policy (scaling strategies, threads, tools) uses.

- `TreeOps`: fork / pause / resume / prune / extend on the engine's live sequences. A fork shares
  every page of its parent (copy-on-write on the partial last page), so n samples, beams and
  particles cost one prefill. `extend` appends tokens nobody sampled (a tool's result) to a paused
  sequence: resumed, it computes only them, as one chunk after the KV it has, and samples after
  them. A policy may also park its sequences when they stop by themselves (`park_on_stop`: an
  assistant message that ended with tool calls waits for their results, pages kept).
- `TreeRun`: one request's tree as a policy sees it: its sequences by state, the tokens it
  generated, its token budget, and the tree operations scoped to it.
- `TreePolicy`: the protocol a policy implements (start / on_step / stop / result).
- `drive` / `cancel` / `fail_stalled` / `run_policies`: the one driver that calls a policy after
  every engine step, used by the synchronous engine (`run_policies`, `LLM.scale`) and by
  `AsyncEngine.run_policy`. A policy may need one more call after its last sequence ended outside
  a step (pruned by its own budget, say) to ask for more work (a judge's requests) or to finish:
  both engines then take a step with nothing scheduled, and a policy that still neither finished
  nor asked for work is stalled and fails (`fail_stalled`) instead of hanging its caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.sampler import derive_seed
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.scheduler import Scheduler
from forkllm.engine.sequence import Request, Sequence, SequenceStatus
from forkllm.kv.concat import JoinBranch, PageJoin, join_pages
from forkllm.kv.manager import KVCacheManager, PageCopy
from forkllm.structured.state import GrammarState

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
StepHook = Callable[["LLMEngine"], None]
# Asked when one of a request's sequences stops by itself (EOS, a stop token or string, its grammar
# complete: finish_reason "stop"; or its length limit: "length"): True parks it (paused, pages
# kept) instead of finishing it.
StopGate = Callable[[Sequence], bool]


class TreeOps:
    """Tree operations over the engine's registry of live sequences (`seqs`, by id)."""

    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, seqs: dict[str, Sequence]) -> None:
        self.kv, self.scheduler, self.seqs = kv, scheduler, seqs
        self.num_forks = 0
        self.num_prunes = 0
        self.stop_gates: dict[str, StopGate] = {}  # by request id (see park_on_stop)
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

    def resume(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.PAUSED:
            raise ValueError(f"no paused sequence {seq.seq_id!r} to resume")
        self.scheduler.resume(seq)

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
            return
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

    # ---- threads: spawn / truncate / join by page ------------------------------------------------
    def spawn(
        self, parent: Sequence, suffixes: Seq[Seq[int]], token_limits: Seq[int | None] | None = None
    ) -> list[Sequence]:
        """One child per suffix, each continuing from the parent's pages with its own tokens
        appended (APR's spawn): scheduled at once, each computes only its suffix, then samples.
        The parent must have every token computed (see `truncate`); `token_limits` bound each
        child's total tokens (its thread's max_tokens)."""
        if parent.finished or self.seqs.get(parent.seq_id) is not parent:
            raise ValueError(f"no live sequence {parent.seq_id!r} to spawn from")
        if parent.num_computed_tokens != parent.num_tokens:
            raise ValueError(f"sequence {parent.seq_id!r} has tokens not computed yet: truncate it first")
        if not suffixes or any(not s for s in suffixes):
            raise ValueError("spawn needs at least one child, each with at least one token")
        kids = self._spawn(parent, parent, len(suffixes), None)
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
        self.end(child, child.finish_reason or "stop")
        return n

    def end(self, seq: Sequence, reason: str) -> None:
        """Finish a live or parked sequence now with `reason` ("stop", "length", ...)."""
        if seq.finished:
            raise ValueError(f"no live sequence {seq.seq_id!r} to end")
        seq.finish_reason = reason
        self.scheduler.finish(seq)  # not self.finish: no stop gate asked
        self.seqs.pop(seq.seq_id, None)


class TreeRun:
    """One request's sequence tree as a policy sees it, with an exact token budget."""

    def __init__(
        self, engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, budget: int | None
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
    def sampling(self) -> bool:
        """The prompt is done and the first sequence drew its first token (n > 1 samples are
        forked then, those over the request's share of the batch later: see `pending`)."""
        return self.seqs[0].num_output_tokens > 0

    @property
    def pending(self) -> int:
        """Samples not forked yet (deferred while the request is at its share of the batch)."""
        return self.request.pending_samples

    @property
    def started(self) -> bool:
        """Every one of the n first samples exists."""
        return self.pending == 0 and self.sampling

    def drop_pending(self) -> None:
        """Give up the samples not forked yet (the policy has decided, or the budget is short)."""
        self.forks -= self.pending  # counted as the engine's forks when the tree was made
        self.engine.cancel_pending_samples(self.request.request_id)

    @property
    def generated(self) -> int:
        """Tokens the tree generated (a fork's inherited tokens are not counted again)."""
        return sum(s.num_output_tokens - s.num_output_at_fork for s in self.seqs)

    def fork(self, seq: Sequence, k: int, seeds: list[int] | None = None) -> list[Sequence]:
        kids = self.engine.tree.fork(seq, k, seeds)
        self.forks += k
        return kids

    def prune(self, seq: Sequence) -> None:
        if not seq.finished:
            self.engine.prune(seq.seq_id)
            self.prunes += 1

    def pause(self, seq: Sequence) -> None:
        if seq.status in (SequenceStatus.RUNNING, SequenceStatus.WAITING):
            self.engine.tree.pause(seq)

    def resume(self, seq: Sequence) -> None:
        self.engine.tree.resume(seq)

    def park_on_stop(self, gate: StopGate | None) -> None:
        """Park this tree's sequences that stop by themselves when `gate(seq)` (see TreeOps)."""
        self.engine.tree.park_on_stop(self.request.request_id, gate)

    def extend(self, seq: Sequence, token_ids: Seq[int], grammar: GrammarState | None = None) -> None:
        """Append unsampled tokens to a paused sequence (TreeOps.extend); ValueError when they
        would not fit max_model_len."""
        limit = self.engine.max_model_len
        if seq.num_tokens + len(token_ids) >= limit:
            raise ValueError(
                f"{len(token_ids)} more tokens do not fit: the sequence has {seq.num_tokens} of "
                f"max_model_len {limit}"
            )
        self.engine.tree.extend(seq, token_ids, grammar)

    def end(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence now with `reason`; the request is retired when it was the last."""
        if seq.finished:
            return
        self.engine.tree.end(seq, reason)
        if self.request.finished and self.engine.requests.get(self.request.request_id) is self.request:
            self.request.metrics.finished_time = time.time()
            self.engine.abort_request(self.request.request_id)  # nothing left to abort: retires it

    def enforce_budget(self, priority: Callable[[Sequence], float] | None = None) -> bool:
        """Prune live sequences (lowest priority first) so that the next step cannot take the
        tree past its budget: each live sequence generates at most one token per step, and each
        pending sample is owed its first token. When the budget cannot cover both, the pending
        samples go first (they have nothing yet). Returns False once the budget is spent."""
        if self.budget is None:
            return True
        live = self.live()
        if self.pending and self.budget - self.generated - self.pending < len(live):
            self.drop_pending()
        remaining = self.budget - self.generated - self.pending
        if len(live) > remaining:
            keep = sorted(live, key=priority, reverse=True) if priority else live
            for s in keep[max(remaining, 0) :]:
                self.prune(s)
        return remaining > 0

    def abort(self) -> None:
        self.engine.abort_request(self.request.request_id)


class TreePolicy(Protocol[R_co]):
    """What the driver needs of a policy. `on_step` runs on the engine's thread after every step
    (also after an empty one: a tree of paused sequences waits for its policy's decision)."""

    @property
    def done(self) -> bool: ...

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        """Create the tree (add its request)."""

    def on_step(self, engine: LLMEngine) -> None:
        """Look at the tree, fork / prune / pause; set done when finished (pruning what runs)."""

    def stop(self) -> None:
        """Stop now: prune whatever still runs and abort the tree's requests."""

    def result(self) -> R_co: ...


class PolicyHandle(Generic[R]):
    """A driven policy: it is the step hook the engine calls, and it settles its caller once
    (`on_done` with the result or the error)."""

    def __init__(self, policy: TreePolicy[R], on_done: Callable[[R | BaseException], None]) -> None:
        self.policy, self.on_done = policy, on_done
        self.settled = False

    def __call__(self, engine: LLMEngine) -> None:
        try:
            if not self.policy.done:
                self.policy.on_step(engine)
            if not self.policy.done:
                return
            engine.remove_step_hook(self)
            outcome: R | BaseException = self.policy.result()
        except BaseException as e:  # a failing policy fails its own caller only
            engine.remove_step_hook(self)
            self.policy.stop()
            outcome = e
        self._settle(outcome)

    def cancel(self, engine: LLMEngine) -> None:
        """Stop now and free the tree's pages (its caller went away)."""
        engine.remove_step_hook(self)
        self.policy.stop()

    def fail(self, engine: LLMEngine, error: BaseException) -> None:
        self.cancel(engine)
        self._settle(error)

    def _settle(self, outcome: R | BaseException) -> None:
        if not self.settled:
            self.settled = True
            self.on_done(outcome)


def drive(
    engine: LLMEngine,
    policy: TreePolicy[R],
    prompt_ids: list[int],
    question: str,
    on_done: Callable[[R | BaseException], None],
) -> PolicyHandle[R]:
    """Start `policy` on the engine and call it after every step until it is done; then hand its
    result (or the error it raised) to `on_done`, once. Runs on the engine's thread."""
    policy.start(engine, prompt_ids, question)
    handle = PolicyHandle(policy, on_done)
    engine.add_step_hook(handle)
    return handle


def cancel(engine: LLMEngine, handle: PolicyHandle[R]) -> None:
    """Stop a driven policy now and free its pages (its caller went away)."""
    handle.cancel(engine)


def driven_policies(engine: LLMEngine) -> list[PolicyHandle[object]]:
    """The policies the engine is driving now (its step hooks that are policy handles)."""
    return [h for h in engine.step_hooks if isinstance(h, PolicyHandle)]


def fail_policies(engine: LLMEngine, error: BaseException) -> int:
    """Stop every driven policy and hand `error` to its caller; returns how many."""
    handles = driven_policies(engine)
    for h in handles:
        h.fail(engine, error)
    return len(handles)


def fail_stalled(engine: LLMEngine) -> int:
    """Call after a step that began and ended with no request in the engine: every policy still
    driven had its chance to ask for work and did not, so it never will; fail each (its caller
    gets a RuntimeError). Returns how many failed."""
    return fail_policies(engine, RuntimeError("a tree policy stalled with nothing to run"))


def run_policies(engine: LLMEngine, jobs: list[tuple[TreePolicy[R], list[int], str]]) -> list[R]:
    """Run policies to completion on a synchronous engine (they share every step's batch)."""
    outcomes: dict[int, R | BaseException] = {}
    handles: list[PolicyHandle[R]] = []

    def reporter(i: int) -> Callable[[R | BaseException], None]:
        return lambda outcome: outcomes.__setitem__(i, outcome)

    try:
        for i, (policy, ids, question) in enumerate(jobs):
            handles.append(drive(engine, policy, ids, question, reporter(i)))
        while len(outcomes) < len(jobs):
            idle = not engine.has_unfinished_requests()
            engine.step()  # runs the hooks even when nothing is scheduled
            if idle and not engine.has_unfinished_requests():
                fail_stalled(engine)
    finally:
        for h in handles:
            if not h.settled:
                h.cancel(engine)
    results = []
    for i in range(len(jobs)):
        r = outcomes[i]
        if isinstance(r, BaseException):
            raise r
        results.append(r)
    return results
