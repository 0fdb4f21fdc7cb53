"""Iteration-level continuous batching with chunked prefill, prefix reuse and recompute preemption.

Every step spends one token budget (`max_num_batched_tokens`) across sequences: running decodes
first (one token each, so long prompts never stall them), then unfinished prompt chunks of
running sequences, then waiting sequences in arrival order (FCFS), each taking as large a chunk
as the budget leaves (SARATHI-style piggybacking). A waiting sequence first revives the longest
run of its leading pages found in the prefix cache and computes only the rest. When the KV pool
cannot hold a running sequence's next tokens, the newest running sequence is preempted: its
pages are released and it is recomputed from its tokens later (mostly from the prefix cache),
ahead of anything still waiting. With chunked prefill off a sequence is taken whole, so the
budget must cover max_model_len (engine/startup.py refuses a smaller one).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.kv.manager import KVCacheManager, PageCopy


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so the step samples a token for it."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


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


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_stats = PrefixStats()

    # ---- queue management ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

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
            self.waiting.appendleft(seq)

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

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Running sequences: decodes (1 token due) first, then unfinished prompt chunks.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        chunks = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + chunks:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, n, out):
                continue
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        if out.preempted:
            return out  # pages are short: admit nothing new this step
        # Waiting sequences, FCFS.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = seq.num_computed_tokens == 0 and not seq.block_table
            if fresh:
                self._reuse_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if (n < remaining and not self.enable_chunked_prefill) or not self.kv.allocate(
                seq.block_table, seq.num_computed_tokens + n, seq.first_write, out.copies
            ):
                if fresh:  # give the revived pages back; they stay cached
                    self._reset(seq)
                break
            if fresh and seq.request.metrics.first_scheduled_time is None and seq.index == 0:
                self.prefix_stats.prompt_tokens += seq.num_prompt_tokens
                self.prefix_stats.reused_tokens += min(seq.num_reused_tokens, seq.num_prompt_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return out

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
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        # A page copy planned for this sequence this step is moot: its pages are released.
        out.copies = [c for c in out.copies if c.dst not in seq.block_table]
        self._reset(seq)
        seq.status = SequenceStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
