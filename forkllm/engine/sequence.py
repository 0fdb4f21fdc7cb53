"""Sequence and Request: the engine's per-generation state.

A Request is what a user submitted (one prompt, one SamplingParams). It owns one or more
Sequences (its `n` samples). A Sequence is the unit the scheduler batches: token ids, how many of
them already have KV in the cache (`num_computed_tokens`), its page table, its sampling state.
Following vLLM v1 there is no prefill/decode flag: a step computes
`num_tokens - num_computed_tokens` tokens (capped by the budget) and samples when it catches up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.outputs import PositionLogprobs, RequestMetrics
from forkllm.engine.sampling_params import SamplingParams
from forkllm.kv.prefix_cache import CacheNode
from forkllm.structured.state import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # holds its pages but is not scheduled (a policy decides its fate)
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    request: Request
    index: int  # which of the request's samples this is
    token_ids: list[int]  # prompt followed by output
    num_prompt_tokens: int
    seed: int
    detok: IncrementalDetokenizer
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache nodes of the leading full pages (registered or reused), in order.
    cache_nodes: list[CacheNode] = field(default_factory=list)
    # Leading tokens whose KV came from the prefix cache: never written again (on a full hit the
    # last token is recomputed for its logits, but its KV write is skipped).
    num_reused_tokens: int = 0
    parent: Sequence | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_output_at_fork: int = 0  # output tokens inherited from the parent when forked
    # Text and token counts already sent to a streaming consumer.
    sent_text_len: int = 0
    sent_tokens: int = 0
    finish_sent: bool = False
    # Structured output: where the output stands in the request's grammar (None: unconstrained).
    # Made with the root sequence, forked with every copy, advanced by every appended token.
    grammar: GrammarState | None = None
    # Reasoning threads (forkllm.threads): a sequence joined by page (kv_concat) holds its
    # children's pages side by side. Its KV slot i then carries RoPE position i - position_shift
    # for every slot written after the join, and `kv_holes` lists the slot ranges [start, end) of
    # those pages that hold no token of its context (never attended to). Such a sequence's KV
    # cannot be recomputed from its tokens: it is never preempted nor prefix-cached.
    position_shift: int = 0
    kv_holes: list[tuple[int, int]] = field(default_factory=list)
    # KV moved in from a concluded thread (TreeOps.conclude): computed with that thread's working
    # tokens in view, so not what its tokens alone compute to.
    kv_moved: bool = False
    # Ends the sequence ("length") once it holds this many tokens (a thread's own max_tokens).
    token_limit: int | None = None
    # Hogwild!-style workers: each decode step attends to the other workers' tokens as written.
    view: SharedView | None = None
    # Children spawned from it so far (TreeOps.spawn): a child's seed derives from this
    # sequence's seed and this count, so a thread samples by its ancestry alone, never by what
    # other trees of its request did first.
    spawned: int = 0

    @property
    def kv_pinned(self) -> bool:
        """Its KV cannot be rebuilt from its tokens (a page-joined thread, a shared-cache worker)."""
        return self.position_shift != 0 or bool(self.kv_holes) or self.kv_moved or self.view is not None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def first_write(self) -> int:
        """The first position whose KV this sequence will write next."""
        return max(self.num_computed_tokens, self.num_reused_tokens)

    @property
    def text(self) -> str:
        return self.detok.text


@dataclass(eq=False)
class SharedView:
    """Workers that share a cache (Hogwild!): each forked from one context at `base` slots and
    writes its own pages after it; in a worker's view come the context, then every other
    worker's tokens (in `workers` order, as many as they have computed), then its own. Keys stay
    where they were written; each segment's query is rotated by where the segment sits in the
    view instead (RoPE attention depends only on the distance)."""

    base: int
    workers: list[Sequence]


@dataclass(eq=False)
class DeferredSamples:
    """Samples of an n > 1 request that did not fit its share of the batch when its prompt was
    done. They are forked later, as its sequences finish, from `anchor` (a paused copy of the
    first sequence at that moment, holding the prompt's pages, outside the request's samples) and
    draw their first token from `logits`, the same row the first samples drew from: a deferred
    sample's tokens are exactly those it would have had if forked at once."""

    anchor: Sequence
    logits: torch.Tensor  # [1, vocab] float32


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # n > 1: samples not forked yet (all n - 1 until the first sequence's prompt is done; after
    # that, the ones deferred because the request was at its share of the batch).
    pending_samples: int = 0
    base_seed: int = 0
    # Lower is scheduled sooner (vLLM's convention); orders the waiting queue and preemption.
    priority: int = 0
    deferred: DeferredSamples | None = None
    # Work the scheduler has given this request so far (cost units, see Scheduler.cost_at): while
    # requests compete, those that have had less are served first.
    service: float = 0.0

    @property
    def finished(self) -> bool:
        return self.pending_samples == 0 and all(s.finished for s in self.seqs)
