"""Iteration-level continuous batching with chunked prefill, prefix reuse, recompute preemption,
priorities and a fair share of the batch for every request.

Every step spends one token budget (`max_num_batched_tokens`) across sequences: running decodes
first (one token each, so long prompts never stall them), then unfinished prompt chunks of
running sequences, then waiting sequences in priority order (lower `priority` first; FCFS within
a priority), each taking as large a chunk as the budget leaves (SARATHI-style piggybacking). A
waiting sequence first revives the longest run of its leading pages found in the prefix cache and
computes only the rest. With chunked prefill off a sequence is taken whole, so the budget must
cover max_model_len (engine/startup.py refuses a smaller one).

Fairness, so that no request holds the engine hostage:
- A prompt chunk is first cut to `long_prefill_token_threshold`, so a long prompt leaves budget
  for the other prompts' first chunks in the same step; budget still left over then extends the
  cut chunks (oldest first), so a prompt alone is chunked exactly as without the threshold. While
  one long prompt is being cut, another long waiting prompt is passed over (the short ones behind
  it are not): long prompts still prefill one after the other, not round-robin.
- A step runs at most `max_num_seqs` sequences. When requests want more than that, each gets a
  max-min fair share of them (a request's demand counts every sequence it will run: its running
  and waiting ones plus samples not forked yet), never more than `max_seq_share` of
  `max_num_seqs`. Sequences over their request's share keep their pages and wait their turn; the
  engine forks n > 1 samples only into free share (`room`).
- A step's time grows with its work and every sequence in it waits for the whole step, so a step
  holds at most `fair_step_tokens` of work, split max-min fairly between requests by what each
  wants (`fair_split`); a request's cut chunks are not extended past its share. Work is counted
  in tokens weighted by their attention context (`cost`): a chunk deep in a near-context prompt
  costs several times a fresh one. A request alone is held to the cap too: a step cannot be
  interrupted, and on a CPU a 2,048-token chunk deep in a long prompt takes seconds that the next
  newcomer would wait (smaller chunks cost no throughput there: measured 11.7 vs 12.5 s for a lone
  4,000-token prompt). A request that has had `LONG_RUNNING_STEPS` capped steps' work
  is demoted, and so is one whose prompt is that much work from the start (skip-join, as
  FastServe's queue for long first iterations): while short requests have work, these share at most
  `LONG_RUNNING_SHARE` of a contended step, and `LONG_RUNNING_SHARE_BESIDE_PROMPTS` of a step
  in which a short request's prompt is computed (a two-level feedback queue: a newcomer's first
  token waits on as little of the long-running work as the one-token floor allows).
- When the KV pool cannot hold a running sequence's next tokens, a sequence is preempted: of the
  lowest priority, from the request running the most sequences, the newest. When it cannot hold
  a waiting sequence's chunk, a sequence left idle over its request's share is preempted for it.
  A preempted sequence's pages are released and it is recomputed from its tokens later (mostly
  from the prefix cache), first in its priority among the waiting.

Prompts that share a prefix and arrive together are computed once: a waiting prompt whose next
uncached pages are the same as those a prompt in this step's batch is computing (at least
`SHARE_MIN_PAGES` pages, and a quarter of what it would compute) waits a step and then revives
them from the prefix cache, instead of computing its own copy in the same step (SGLang's
in-batch prefix caching does the same).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from forkllm.engine.sequence import Request, Sequence, SequenceStatus
from forkllm.kv.manager import KVCacheManager, PageCopy

# A waiting prompt waits for a prompt in the batch to compute a shared prefix (and then reuses it)
# when they share at least this many uncached pages, and at least a quarter of its uncached ones.
SHARE_MIN_PAGES = 4

# Multi-level feedback (as FastServe's skip-join MLFQ): a request that has had this many contended
# steps' worth of work is long-running; while a short request has work, the long-running ones
# share at most this fraction of a contended step, so a near-context prefill or 128 decode rows
# add little to the steps that newcomers' prompts and other users' decodes wait on.
LONG_RUNNING_STEPS = 4
LONG_RUNNING_SHARE = 0.25
# ... and while a short request has a prompt to compute (its first token waits on the step), this.
LONG_RUNNING_SHARE_BESIDE_PROMPTS = 1 / 16


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # includes the draft tokens
    # Speculative decoding (engine/spec): tokens to verify after the sequence's last token.
    draft: list[int] = field(default_factory=list)
    # A draft tree: each draft token's parent (-1: the last token); None: a chain (engine/spec/tree.py).
    draft_parents: list[int] | None = None

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so the step samples a token for it."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[PageCopy] = field(default_factory=list)  # copy-on-write before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class PrefixStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
    reused_tokens: int = 0  # of those, tokens whose KV came from the prefix cache

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def fair_shares(demand: dict[Request, int], slots: int, bound: int) -> dict[Request, int]:
    """Max-min fair split of `slots` sequence slots over requests wanting `demand[req]` each, none
    getting more than `bound`. Requests are served by priority (lower first), then smallest demand
    first, then in the order given (oldest first), each taking its demand or an even part of what
    is left (rounded up: with more requests than slots, the first served get one each)."""
    order = sorted(demand, key=lambda r: (r.priority, demand[r]))  # stable: ties keep their order
    shares: dict[Request, int] = {}
    left = slots
    for i, req in enumerate(order):
        even = -(-left // (len(order) - i))
        shares[req] = give = min(demand[req], bound, even)
        left -= give
    return shares


def fair_split(demand: dict[Request, float], total: float) -> dict[Request, float]:
    """Split `total` work over requests wanting `demand[req]` each, least attained service first
    (by priority, then the work each has had so far, `Request.service`): each takes its demand
    while work is left. A new request's prompt goes ahead of a request that has been running for
    a while, however small that one's demand in this step (128 decode rows look small next to a
    400-token prompt, but they are its hundredth step); the scheduler still moves every request
    by at least one token a step."""
    order = sorted(demand, key=lambda r: (r.priority, r.service))
    out: dict[Request, float] = {}
    left = total
    for req in order:
        out[req] = give = min(demand[req], left)
        left -= give
    return out


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int = 0,
        max_seq_share: float = 1.0,
        fair_step_tokens: int = 0,
        attention_cost_tokens: int = 0,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # A prompt chunk's first cut (0: none); leftover budget extends it again (see schedule).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # Most sequences one request may run in a step while others want slots.
        self.max_seqs_per_request = max(1, int(max_num_seqs * max_seq_share))
        # Context length at which a token's attention costs as much as its matmuls (0: context is
        # not weighed); see ModelConfig.attention_cost_tokens.
        self.attention_cost_tokens = attention_cost_tokens
        # Work in a contended step (0: no cap), as the cost of that many fresh prompt tokens.
        self.fair_step_cost = self.cost_at(0, fair_step_tokens) if fair_step_tokens else 0.0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Requests with n > 1 samples deferred (DeferredSamples): they have demand even when none
        # of their sequences is running or waiting.
        self.deferred: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_scheduled = 0  # sequences in the last step's batch
        self.prefix_stats = PrefixStats()

    # ---- queue management ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, first=False)

    def _enqueue(self, seq: Sequence, first: bool) -> None:
        """Into the waiting queue by priority (lower first): behind its equals (FCFS), or ahead of
        them when `first` (a preempted or resumed sequence, which has waited already)."""
        w, p = self.waiting, seq.request.priority
        if first:
            if not w or w[0].request.priority >= p:
                w.appendleft(seq)
                return
            i = next((i for i, s in enumerate(w) if s.request.priority >= p), len(w))
        else:
            if not w or w[-1].request.priority <= p:
                w.append(seq)
                return
            i = next(i for i, s in enumerate(w) if s.request.priority > p)
        w.insert(i, seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """Insert a fork next to its parent, in the parent's queue (running if the parent is
        paused: the fork already holds the parent's pages)."""
        if after.status is SequenceStatus.WAITING:
            seq.status = SequenceStatus.WAITING
            self.waiting.insert(self.waiting.index(after) + 1, seq)
        else:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def pause(self, seq: Sequence) -> None:
        """Stop scheduling a sequence but keep its pages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        if seq.block_table:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self._enqueue(seq, first=True)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted, pruned) sequence from the queues and release its pages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq.block_table, seq.cache_nodes)
        seq.status = SequenceStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- shares of the batch ------------------------------------------------------------------
    def _live_counts(self) -> Counter[Request]:
        """Running and waiting sequences per request (requests with deferred samples included)."""
        counts = Counter(s.request for s in itertools.chain(self.running, self.waiting))
        for req in self.deferred.values():
            counts.setdefault(req, 0)
        return counts

    def _shares(self, live: Counter[Request]) -> dict[Request, int] | None:
        """Each request's most sequences this step, or None when every demand fits the batch."""
        demand = {req: n + req.pending_samples for req, n in live.items()}
        if len(demand) < 2 or sum(demand.values()) <= self.max_num_seqs:
            return None
        return fair_shares(demand, self.max_num_seqs, self.max_seqs_per_request)

    def room(self, requests: Iterable[Request]) -> dict[Request, int]:
        """How many more sequences each request may start now (the engine forks n > 1 samples
        into this room; the rest wait as deferred samples)."""
        live = self._live_counts()
        shares = self._shares(live)
        out = {}
        for req in requests:
            share = self.max_num_seqs if shares is None else shares.get(req, 0)
            out[req] = max(0, share - live.get(req, 0))
        return out

    # ---- the work of a step --------------------------------------------------------------------
    def cost_at(self, start: int, n: int) -> float:
        """Work of computing n tokens after `start` in context: n token-equivalents, plus their
        attention over the context, counted in tokens by attention_cost_tokens."""
        k = self.attention_cost_tokens
        return n * (1.0 + (start + n / 2) / k) if k else float(n)

    def tokens_within(self, start: int, cost: float) -> int:
        """The most tokens after `start` whose work (cost_at) is at most `cost`."""
        k = self.attention_cost_tokens
        if cost <= 0:
            return 0
        if not k:
            return int(cost)
        b = 1.0 + start / k  # cost_at(start, n) = b n + n^2 / 2k
        return int(k * (math.sqrt(b * b + 2 * cost / k) - b) + 1e-9)

    def _long_running(self, req: Request, due: float) -> bool:
        """Demoted: it has had LONG_RUNNING_STEPS capped steps of work, or what it still wants is
        that much from the start (skip-join). Never without a work cap."""
        long_at = LONG_RUNNING_STEPS * self.fair_step_cost
        return bool(long_at) and (req.service >= long_at or due >= long_at)

    def _step_caps(self) -> dict[Request, float] | None:
        """Each request's most work in this step, or None when the cap is off. A request alone is
        held to the cap as well: a step cannot be interrupted, so a 2,048-token chunk deep in a long
        prompt (seconds on a CPU) would be what the next newcomer waits for."""
        if not self.fair_step_cost:
            return None
        demand: dict[Request, float] = {}
        prompts: set[Request] = set()  # requests with a prompt chunk to compute
        for s in itertools.chain(self.running, self.waiting):
            due = s.num_tokens - s.num_computed_tokens
            demand[s.request] = demand.get(s.request, 0.0) + self.cost_at(s.num_computed_tokens, due)
            if due > 1:
                prompts.add(s.request)
        total = self.fair_step_cost
        short = {r: d for r, d in demand.items() if not self._long_running(r, d)}
        if not short or len(short) == len(demand):
            return fair_split(demand, total)
        caps = fair_split(short, total)
        share = LONG_RUNNING_SHARE_BESIDE_PROMPTS if prompts.intersection(short) else LONG_RUNNING_SHARE
        left = min(total - sum(caps.values()), total * share)
        caps.update(fair_split({r: d for r, d in demand.items() if r not in short}, left))
        return caps

    def first_token_work(self) -> tuple[float, float]:
        """(ahead, per_step): the prompt work (units) a new request would wait behind before its
        first token, and the work every step carries besides: a unit per decode row plus the
        long-running requests' share, which newcomers overtake (step_cost.FirstTokenLoad)."""
        cap = self.fair_step_cost
        rows = 0
        prompt_due: dict[Request, float] = {}
        for s in itertools.chain(self.running, self.waiting):
            due = s.num_tokens - s.num_computed_tokens
            if due <= 1:
                rows += due
            else:
                work = self.cost_at(s.num_computed_tokens, due)
                prompt_due[s.request] = prompt_due.get(s.request, 0.0) + work
        ahead = long_due = 0.0
        for req, work in prompt_due.items():
            if self._long_running(req, work):
                long_due += work
            else:
                ahead += work
        return ahead, rows + min(long_due, LONG_RUNNING_SHARE_BESIDE_PROMPTS * cap)

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        slots = self.max_num_seqs
        live = self._live_counts()
        shares = self._shares(live)
        taken: dict[Request, int] = {}
        cut = self.long_prefill_token_threshold or budget
        long_cut = False  # a chunk was cut to the threshold this step
        caps = self._step_caps()
        spent: dict[Request, float] = {}

        def over_share(req: Request) -> bool:
            return shares is not None and taken.get(req, 0) >= shares.get(req, 0)

        def within_cap(seq: Sequence, n: int) -> int:
            """n cut to what its request's work cap leaves (at least 1 token for a request that
            has nothing in the step yet, so every request moves)."""
            if caps is None:
                return n
            req = seq.request
            left = caps[req] - spent.get(req, 0.0)
            fit = self.tokens_within(seq.num_computed_tokens, left)
            return min(n, max(fit, 0 if req in spent else 1))

        def charge(seq: Sequence, n: int) -> None:
            work = self.cost_at(seq.num_computed_tokens, n)
            seq.request.service += work
            if caps is not None:
                spent[seq.request] = spent.get(seq.request, 0.0) + work

        def reclaim() -> bool:
            """Preempt the newest running sequence this step leaves idle because its request has
            its share (its pages are held for nothing while a newcomer cannot start)."""
            if shares is None:
                return False
            busy = {id(s.seq) for s in out.scheduled}
            for seq in reversed(self.running):
                if id(seq) not in busy and over_share(seq.request):
                    self._preempt(seq, out)
                    return True
            return False

        # Running sequences: decodes (1 token due) first, then unfinished prompt chunks.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        chunks = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + chunks:
            if budget == 0 or slots == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or (shares is not None and over_share(seq.request)):
                continue  # preempted earlier in this loop, or its request has its share
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = within_cap(seq, min(remaining, budget, cut))
            if n == 0:
                continue  # its request has its share of the step's work
            if self._allocate_or_preempt(seq, n, out):
                charge(seq, n)
                out.scheduled.append(ScheduledSequence(seq, n))
                if shares is not None:
                    taken[seq.request] = taken.get(seq.request, 0) + 1
                budget -= n
                slots -= 1
                long_cut |= n == cut < remaining
        if out.preempted:
            self.num_scheduled = len(out.scheduled)
            return out  # pages are short: admit nothing new this step
        # Waiting sequences, by priority then arrival; one over its request's share is passed over,
        # and a long one while another long prompt is being cut.
        admit = (over_share, reclaim, within_cap, charge)
        passed_long = self._admit(out, budget, slots, taken, admit, cut, long_cut)
        budget = self.max_num_batched_tokens - out.num_batched_tokens
        if caps is None and cut < self.max_num_batched_tokens and budget:
            budget = self._extend_cut_chunks(out, budget)
            if passed_long and budget:  # the cut prompt is done: the next long one may start
                slots = self.max_num_seqs - len(out.scheduled)
                self._admit(out, budget, slots, taken, admit, budget, False)
        self.num_scheduled = len(out.scheduled)
        return out

    def _admit(
        self,
        out: SchedulerOutput,
        budget: int,
        slots: int,
        taken: dict[Request, int],
        admit: tuple[
            Callable[[Request], bool], Callable[[], bool], Callable[[Sequence, int], int], Callable[..., None]
        ],
        cut: int,
        long_cut: bool,
    ) -> bool:
        """Move waiting sequences into the batch while budget, slots and pages last (pages held by
        sequences idle over their request's share are reclaimed for them), each chunk within its
        request's share of the step's work; returns whether a long prompt was passed over because
        another was being cut."""
        over_share, reclaim, within_cap, charge = admit
        passed_long = False
        leaders = self._prefix_leaders(out)
        i = 0
        while i < len(self.waiting) and budget > 0 and slots > 0:
            seq = self.waiting[i]
            long = seq.num_tokens - seq.num_computed_tokens > cut
            if over_share(seq.request) or (long_cut and long):
                passed_long |= long_cut and long
                i += 1
                continue
            fresh = seq.num_computed_tokens == 0 and not seq.block_table
            if fresh:
                self._reuse_prefix(seq)
                if leaders is not None and self._follows(seq, leaders):
                    self._reset(seq)  # computed by a leader this step; revived from the cache next
                    i += 1
                    continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = within_cap(seq, min(remaining, budget, cut)) if self.enable_chunked_prefill else remaining
            if n == 0:  # its request has its share of the step's work
                if fresh:
                    self._reset(seq)
                i += 1
                continue
            if n > budget or not self.kv.allocate(
                seq.block_table, seq.num_computed_tokens + n, seq.first_write, out.copies
            ):
                if fresh:  # give the revived pages back; they stay cached
                    self._reset(seq)
                if reclaim():
                    i = self.waiting.index(seq)  # the preempted one went in ahead of it
                    continue
                break
            if fresh and seq.request.metrics.first_scheduled_time is None and seq.index == 0:
                self.prefix_stats.prompt_tokens += seq.num_prompt_tokens
                self.prefix_stats.reused_tokens += min(seq.num_reused_tokens, seq.num_prompt_tokens)
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            charge(seq, n)
            out.scheduled.append(ScheduledSequence(seq, n))
            if leaders is not None:
                self._lead(seq, leaders)
            taken[seq.request] = taken.get(seq.request, 0) + 1
            budget -= n
            slots -= 1
            long_cut |= n == cut < remaining
        return passed_long

    # ---- in-batch prefix sharing ----------------------------------------------------------------
    def _prefix_leaders(
        self, out: SchedulerOutput
    ) -> dict[tuple[int, tuple[int, ...]], list[Sequence]] | None:
        """The prompts this step computes, by their first uncached page (the cache node it hangs
        from and its tokens); None when there is no prefix cache."""
        if self.kv.cache is None:
            return None
        leaders: dict[tuple[int, tuple[int, ...]], list[Sequence]] = {}
        for item in out.scheduled:
            if item.seq.num_tokens - item.seq.num_computed_tokens > 1:
                self._lead(item.seq, leaders)
        return leaders

    def _frontier(self, seq: Sequence) -> tuple[int, tuple[int, ...]] | None:
        """A prompt's first page not in the prefix cache, keyed by the node it follows (None: no
        full uncached page, or a sequence whose pages are never cached)."""
        if seq.kv_pinned or seq.params.prompt_logprobs is not None:
            return None
        bs = self.kv.block_size
        p = len(seq.cache_nodes)
        if (p + 1) * bs > seq.num_prompt_tokens:
            return None
        parent = id(seq.cache_nodes[-1]) if seq.cache_nodes else 0
        return parent, tuple(seq.token_ids[p * bs : (p + 1) * bs])

    def _lead(self, seq: Sequence, leaders: dict[tuple[int, tuple[int, ...]], list[Sequence]]) -> None:
        key = self._frontier(seq)
        if key is not None:
            leaders.setdefault(key, []).append(seq)

    def _follows(self, seq: Sequence, leaders: dict[tuple[int, tuple[int, ...]], list[Sequence]]) -> bool:
        """Whether a fresh prompt shares enough uncached pages with a prompt computing them now."""
        key = self._frontier(seq)
        if key is None or key not in leaders:
            return False
        bs = self.kv.block_size
        p = len(seq.cache_nodes)
        own = seq.num_prompt_tokens // bs - p  # full uncached pages of its prompt
        for lead in leaders[key]:
            end = min(seq.num_prompt_tokens, lead.num_prompt_tokens) // bs
            shared = (
                next(
                    (
                        j
                        for j in range(p, end)
                        if seq.token_ids[j * bs : (j + 1) * bs] != lead.token_ids[j * bs : (j + 1) * bs]
                    ),
                    end,
                )
                - p
            )
            if shared >= SHARE_MIN_PAGES and 4 * shared >= own:
                return True
        return False

    def _extend_cut_chunks(self, out: SchedulerOutput, budget: int) -> int:
        """Budget left after every sequence had its turn goes back to chunks cut to the threshold,
        in schedule order (the oldest prompt first), without preempting; returns what is left."""
        for item in out.scheduled:
            if budget == 0:
                break
            seq = item.seq
            extra = min(seq.num_tokens - seq.num_computed_tokens - item.num_new_tokens, budget)
            if extra > 0 and self.kv.allocate(
                seq.block_table,
                seq.num_computed_tokens + item.num_new_tokens + extra,
                seq.first_write,
                out.copies,
            ):
                start = seq.num_computed_tokens + item.num_new_tokens
                seq.request.service += self.cost_at(start, extra)
                item.num_new_tokens += extra
                budget -= extra
        return budget

    def _reuse_prefix(self, seq: Sequence) -> None:
        if seq.params.prompt_logprobs is not None:
            return  # prompt logprobs need the logits of every prompt position
        nodes = self.kv.match_prefix(seq.token_ids)
        if not nodes:
            return
        self.kv.acquire_prefix(seq.block_table, nodes)
        seq.cache_nodes = list(nodes)
        seq.num_reused_tokens = len(nodes) * self.kv.block_size
        # At least the last token is computed: its logits give the next token.
        seq.num_computed_tokens = min(seq.num_reused_tokens, seq.num_tokens - 1)

    def _reset(self, seq: Sequence) -> None:
        self.kv.free(seq.block_table, seq.cache_nodes)
        seq.num_computed_tokens = 0
        seq.num_reused_tokens = 0

    def _allocate_or_preempt(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate(seq.block_table, seq.num_computed_tokens + n, seq.first_write, out.copies):
            victim = self._victim()
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _victim(self) -> Sequence:
        """The running sequence to preempt: lowest priority (largest value), then from the request
        running the most sequences (a wide request pays for its own growth, not a newcomer), then
        the newest. O(running), and only when pages are short."""
        running = self.running
        counts: dict[Request, int] = {}
        for s in running:
            counts[s.request] = counts.get(s.request, 0) + 1
        # A page-joined thread cannot be recomputed from its tokens: it goes last, and when it
        # must go all the same, its request ends (see _preempt).
        best = max(
            range(len(running)),
            key=lambda i: (
                not running[i].kv_pinned,
                running[i].request.priority,
                counts[running[i].request],
                i,
            ),
        )
        return running[best]

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        # A page copy planned for this sequence this step is moot: its pages are released.
        out.copies = [c for c in out.copies if c.dst not in seq.block_table]
        if seq.kv_pinned:  # its KV cannot be rebuilt: it ends, and its thread policy fails
            self.kv.free(seq.block_table, seq.cache_nodes)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
            seq.stop_reason = "the KV cache ran out of pages for a page-joined thread"
            out.preempted.append(seq)
            return
        self._reset(seq)
        seq.status = SequenceStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, first=True)
        out.preempted.append(seq)
