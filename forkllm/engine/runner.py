"""ModelRunner: owns the KV tensors, packs a scheduled batch into flat tensors (token ids, positions,
cache slots), asks the attention backend for the step's metadata, runs the model once.

Returns logits only for the rows that need them: the last token of every sequence that samples
this step, every position of a drafted sequence (speculative decoding verifies each), plus prompt
positions of requests that asked for prompt_logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from forkllm.attention.backend import AttentionBackend, select_backend
from forkllm.attention.metadata import AttentionBatch, KeySegment, PrefillChunk
from forkllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from forkllm.engine.sequence import Sequence, SharedView
from forkllm.engine.spec import tree as draft_tree
from forkllm.kernels import Kernels
from forkllm.kv.block_pool import NULL_BLOCK
from forkllm.kv.manager import PageCopy
from forkllm.models.config import ModelConfig
from forkllm.models.llama import LlamaForCausalLM
from forkllm.models.rope import rerotate

NULL_SLOT = 0  # KV writes of tokens whose KV is already cached go to the padding page (page 0)


@dataclass
class PromptLogitsChunk:
    seq: Sequence
    start: int  # the prompt position whose *next* token the first row predicts
    logits: torch.Tensor  # [rows, vocab] float32


@dataclass
class RunnerOutput:
    sample_seqs: list[Sequence]
    # [len(sample_seqs) + draft rows, vocab] float32: the sampling rows, then 1 + len(draft)
    # rows for each drafted sequence, in `drafted` order
    logits: torch.Tensor
    prompt_logits: list[PromptLogitsChunk] = field(default_factory=list)
    drafted: list[ScheduledSequence] = field(default_factory=list)


def key_valid(holes: list[tuple[int, int]], num_slots: int) -> torch.Tensor | None:
    """bool [num_slots]: False at the slots of a page-joined sequence that hold no token."""
    if not holes:
        return None
    valid = torch.ones(num_slots, dtype=torch.bool)
    for start, end in holes:
        valid[start:end] = False
    return valid


def key_segments(holes: list[tuple[int, int]], num_slots: int) -> list[KeySegment] | None:
    """The slot ranges of [0, num_slots) outside `holes` (None: no holes)."""
    if not holes:
        return None
    out, at = [], 0
    for a, b in holes:
        if a > at:
            out.append(KeySegment(at, a))
        at = max(at, b)
    if at < num_slots:
        out.append(KeySegment(at, num_slots))
    return out


def worker_segments(seq: Sequence, view: SharedView, pos: int) -> list[KeySegment]:
    """A shared-cache worker's decode query at slot `pos`: the context, each other worker's
    computed tokens (from its own pages), then its own tokens up to `pos`; each segment's query
    shifted so the distances are those of the view (context, others in order, itself last)."""
    base = view.base
    others = [w for w in view.workers if w is not seq and w.block_table]
    own_start = base + sum(w.num_computed_tokens - base for w in others)  # where its block sits
    segs = [KeySegment(0, base, None, own_start - base)]
    at = base
    for w in others:
        n = w.num_computed_tokens - base
        if n > 0:
            segs.append(KeySegment(base, base + n, w.block_table, own_start - at))
            at += n
    segs.append(KeySegment(base, pos + 1))
    return segs


class ModelRunner:
    """Owns the KV tensors, the attention backend (chosen once here from the kernels and the
    shared-prefix settings) and the model, with its layers swapped onto the kernels."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: Kernels,
        shared_prefix_attention: bool = True,
        min_shared_prefix_tokens: int = 256,
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.kernels = kernels
        shape = (2, config.num_kv_heads, num_blocks * block_size, config.head_dim)
        # torch.empty: pages are zeroed lazily on first use (see kv.block_pool).
        self.kv_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.zero_blocks([NULL_BLOCK])
        self.scale = config.head_dim**-0.5
        self.attention: AttentionBackend = select_backend(
            kernels, block_size, self.scale, device, shared_prefix_attention, min_shared_prefix_tokens
        )
        model.use_cpu_kernels(kernels)
        self.attention.shift_queries = lambda x, shift: rerotate(x, shift, model.rotary)

    def _pages(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(2, cache.shape[1], self.num_blocks, -1)

    def zero_blocks(self, blocks: list[int]) -> None:
        if not blocks:
            return
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            self._pages(cache).index_fill_(2, idx, 0)

    def copy_blocks(self, copies: list[PageCopy]) -> None:
        """Copy-on-write: duplicate shared pages (every layer) before a sequence writes into them."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([c.dst for c in copies], dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            pages = self._pages(cache)
            pages.index_copy_(2, dst, pages.index_select(2, src))

    @torch.inference_mode()
    def move_slots(self, src: list[int], dst: list[int], delta: list[int]) -> None:
        """Copy the KV of cache slots `src` to `dst` (every layer), each key re-rotated from its
        position p to p + delta (a thread's conclusion moved into its parent, positions reused)."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.device)
        dt = torch.tensor(delta, dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            keys = cache[0].index_select(1, s).transpose(0, 1)  # [n, hkv, d]
            values = cache[1].index_select(1, s)
            cache[0].index_copy_(1, d, rerotate(keys, dt, self.model.rotary).transpose(0, 1))
            cache[1].index_copy_(1, d, values)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.copy_blocks(sched.copies)
        bs = self.block_size
        # Decodes (one query each) first, then multi-token chunks: the layout attention expects.
        # A drafted sequence is one decode row per position (its last token, then each draft
        # token), each seeing the context up to itself: causal verification of the chain.
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1 or s.draft]
        chunks = [s for s in sched.scheduled if s.num_new_tokens != 1 and not s.draft]
        if self.kernels.batch_invariant:  # deterministic: every token is a row of the row kernel
            decodes, chunks = list(sched.scheduled), []

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        # A page-joined thread attends the segments around the holes in its pages, a shared-cache
        # worker its view's segments (neither is ever drafted): one attention row per segment.
        # A draft tree's rows attend their own ancestors only (engine/spec/tree.py): segments too.
        holey = any(s.seq.kv_holes or s.seq.view is not None or s.draft_parents for s in decodes)
        segments: list[list[KeySegment] | None] = []
        for s in decodes:
            seq = s.seq
            pos = seq.num_computed_tokens
            table = seq.block_table
            tokens = (
                (seq.token_ids[pos], *s.draft) if s.draft else seq.token_ids[pos : pos + s.num_new_tokens]
            )
            parents = s.draft_parents
            depth = [0, *draft_tree.depths(parents)] if parents else None
            for j, token in enumerate(tokens):
                p = pos + j  # the row's slot; its position is its depth in a tree
                input_ids.append(token)
                positions.append((p if depth is None else pos + depth[j]) - seq.position_shift)
                # A fully cached prompt recomputes its last token for the logits only: that KV exists.
                slots.append(NULL_SLOT if p < seq.num_reused_tokens else table[p // bs] * bs + p % bs)
                ctx_lens.append(p + 1)
                tables.append(table)
                if holey:
                    view = seq.view
                    if parents:
                        segments.append(draft_tree.segments(parents, pos, j - 1))
                    elif view is None:
                        segments.append(key_segments(seq.kv_holes, p + 1))
                    else:
                        segments.append(worker_segments(seq, view, p))
        # Prompt chunks: many tokens, attending to their cached prefix and causally to themselves.
        prefill_chunks: list[PrefillChunk] = []
        for s in chunks:
            seq, n = s.seq, s.num_new_tokens
            c = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[c : c + n])
            chunk_pos = torch.arange(c, c + n)
            positions.extend(range(c - seq.position_shift, c + n - seq.position_shift))
            table_t = torch.tensor(seq.block_table[: -(-(c + n) // bs)], dtype=torch.long)
            chunk_slots = table_t[chunk_pos // bs] * bs + chunk_pos % bs
            if c < seq.num_reused_tokens:
                chunk_slots[: seq.num_reused_tokens - c] = NULL_SLOT
            slots.extend(chunk_slots.tolist())
            prefill_chunks.append(PrefillChunk(c, n, table_t, key_valid(seq.kv_holes, c + n)))
        batch = AttentionBatch(
            torch.tensor(slots, dtype=torch.long),
            tables,
            ctx_lens,
            prefill_chunks,
            segments if holey else None,
        )
        meta = self.attention.build_metadata(batch)
        dev = self.device
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids_t, pos_t, self.attention.context(self.kv_caches, meta))
        return self._logits(hidden, decodes + chunks)

    @torch.inference_mode()
    def draft_greedy(self, rows: list[tuple[Sequence, int, int]], num_layers: int) -> list[int]:
        """Self-speculation: one early-exit pass over single-token rows (sequence, position, token
        at that position), the first `num_layers` layers then the final norm and LM head; returns
        each row's most likely next token. Writes those layers' KV at the positions (pages must
        be allocated); the verifying forward later writes the same values there."""
        bs = self.block_size
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p, _ in rows]
        batch = AttentionBatch(
            torch.tensor(slots, dtype=torch.long),
            [seq.block_table for seq, _, _ in rows],
            [p + 1 for _, p, _ in rows],
        )
        meta = self.attention.build_metadata(batch)
        dev = self.device
        ids_t = torch.tensor([t for _, _, t in rows], dtype=torch.long, device=dev)
        pos_t = torch.tensor([p for _, p, _ in rows], dtype=torch.long, device=dev)
        hidden = self.model(ids_t, pos_t, self.attention.context(self.kv_caches, meta), num_layers=num_layers)
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()

    def _logits(self, hidden: torch.Tensor, items: list[ScheduledSequence]) -> RunnerOutput:
        """Project the rows that need logits: sampling rows, then every row of the drafted
        sequences, and requested prompt positions."""
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        draft_rows: list[int] = []
        drafted: list[ScheduledSequence] = []
        prompt_rows: list[tuple[ScheduledSequence, int, int, int]] = []  # (item, first row, count, start pos)
        row = 0
        for s in items:
            seq, n = s.seq, s.num_new_tokens
            if s.draft:
                draft_rows.extend(range(row, row + n))
                drafted.append(s)
            elif s.samples:
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)
            req = seq.request
            if req.params.prompt_logprobs is not None and seq.index == 0:
                c = seq.num_computed_tokens
                # Positions c .. c+n-1 predict tokens c+1 .. c+n; keep those that are prompt tokens
                # and that an earlier (pre-preemption) pass has not scored already.
                done = len(req.prompt_logprobs or [None]) - 1
                first = max(c, done)
                last = min(c + n, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows.append((s, row + first - c, last - first, first))
            row += n
        dev = hidden.device
        rows = torch.tensor(sample_rows + draft_rows, dtype=torch.long, device=dev)
        logits = self.model.compute_logits(hidden[rows])
        prompt_logits = [
            PromptLogitsChunk(s.seq, start, self.model.compute_logits(hidden[r0 : r0 + cnt]))
            for s, r0, cnt, start in prompt_rows
        ]
        return RunnerOutput(sample_seqs, logits, prompt_logits, drafted)
