"""Tree policies and their one driver.

- `TreeRun`: one request's tree as a policy sees it: its sequences by state, the tokens it
  generated, its token budget, and the tree operations (engine/tree.py) scoped to it.
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
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from forkllm.engine.events import TreeWatcher
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.sequence import Request, Sequence, SequenceStatus
from forkllm.engine.tree import StopGate
from forkllm.structured.state import GrammarState

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class TreeRun:
    """One request's sequence tree as a policy sees it, with an exact token budget."""

    def __init__(
        self,
        engine: LLMEngine,
        prompt_ids: list[int],
        params: SamplingParams,
        budget: int | None,
        watch: TreeWatcher | None = None,
    ) -> None:
        """`watch`: report the tree's operations as they happen (engine/events.py)."""
        self.engine = engine
        self.budget = budget
        params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
        if budget is not None and params.n > budget:
            raise ValueError(
                f"budget ({budget} tokens) is smaller than the {params.n} first tokens of n={params.n}"
            )
        rid = engine.add_request(prompt_ids, params)
        self.request: Request = engine.requests[rid]
        if watch is not None:
            engine.watch(rid, watch, hold=True)  # released by the driver when the policy is done
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

    def note(self, kind: str, seq: Sequence, value: float | None = None, **data: Any) -> None:
        """Tell the tree's watcher what the policy decided about a sequence ("score", "vote")."""
        self.engine.tree.events.emit(kind, seq, value=value, data=data)

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
    (also after an empty one: a tree of paused sequences waits for its policy's decision). A
    policy may have a `watch` (a TreeWatcher it passes to TreeRun): the driver ends that watch
    when the policy is done."""

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
        engine.tree.events.release(getattr(self.policy, "watch", None))
        self._settle(outcome)

    def cancel(self, engine: LLMEngine) -> None:
        """Stop now and free the tree's pages (its caller went away)."""
        engine.remove_step_hook(self)
        self.policy.stop()
        engine.tree.events.release(getattr(self.policy, "watch", None))

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


def run_policies(
    engine: LLMEngine,
    jobs: list[tuple[TreePolicy[R], list[int], str]],
    requests: dict[str, RequestOutput | None] | None = None,
) -> list[R]:
    """Run policies to completion on a synchronous engine (they share every step's batch).
    `requests`: plain requests already added (by id) that run in the same steps, each one's final
    output stored there as it finishes (FINAL_ONLY); returns when they are done too."""
    waiting = {} if requests is None else requests
    outcomes: dict[int, R | BaseException] = {}
    handles: list[PolicyHandle[R]] = []

    def reporter(i: int) -> Callable[[R | BaseException], None]:
        return lambda outcome: outcomes.__setitem__(i, outcome)

    try:
        for i, (policy, ids, question) in enumerate(jobs):
            handles.append(drive(engine, policy, ids, question, reporter(i)))
        while len(outcomes) < len(jobs) or None in waiting.values():
            idle = not engine.has_unfinished_requests()
            for out in engine.step():  # runs the hooks even when nothing is scheduled
                if out.finished and out.request_id in waiting:
                    waiting[out.request_id] = out
            lost = [r for r, o in waiting.items() if o is None and r not in engine.requests]
            if lost:
                raise RuntimeError(f"request {lost[0]!r} ended without its final output")
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
