"""ModelRunner: owns the KV tensors, packs a scheduled batch into flat tensors, runs the model once.

Returns logits only for the rows that need them: the last token of every sequence that samples
this step, plus prompt positions of requests that asked for prompt_logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from forkllm.attention.paged import AttentionMetadata, PagedAttention, PrefillSpan, SharedPrefixGroups
from forkllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from forkllm.engine.sequence import Sequence
from forkllm.kv.block_pool import NULL_BLOCK
from forkllm.kv.manager import PageCopy
from forkllm.models.config import ModelConfig
from forkllm.models.llama import LlamaForCausalLM

NULL_SLOT = 0  # KV writes of tokens whose KV is already cached go to the padding page (page 0)


@dataclass
class PromptLogitsChunk:
    seq: Sequence
    start: int  # the prompt position whose *next* token the first row predicts
    logits: torch.Tensor  # [rows, vocab] float32


@dataclass
class RunnerOutput:
    sample_seqs: list[Sequence]
    logits: torch.Tensor  # [len(sample_seqs), vocab] float32
    prompt_logits: list[PromptLogitsChunk] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        shared_prefix_attention: bool = True,
        min_shared_prefix_tokens: int = 256,
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.shared_prefix_attention = shared_prefix_attention
        self.min_shared_pages = max(1, -(-min_shared_prefix_tokens // block_size))
        shape = (2, config.num_kv_heads, num_blocks * block_size, config.head_dim)
        # torch.empty: pages are zeroed lazily on first use (see kv.block_pool).
        self.kv_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.zero_blocks([NULL_BLOCK])
        self.scale = config.head_dim**-0.5
        from forkllm.kernels import ops

        self.kernels = ops() if device.type == "cpu" else None  # optional C++ CPU kernels
        self.decode_kernel = device.type == "cpu" and _kernel_supports(config)
        self.shared_kernel = self.decode_kernel  # softmax / merge kernels for the matmul path
        # Fused shared-prefix kernel (AVX512-BF16): bf16 caches only.
        self.shared_fused = self.decode_kernel and dtype == torch.bfloat16 and _fused_shared_supports(config)
        if device.type == "cpu":
            model.use_cpu_kernels(self.kernels)

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
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.copy_blocks(sched.copies)
        bs = self.block_size
        # Decodes (one query each) first, then multi-token chunks: the layout PagedAttention expects.
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        chunks = [s for s in sched.scheduled if s.num_new_tokens != 1]

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        ctx_lens: list[int] = []
        for s in decodes:
            seq = s.seq
            pos = seq.num_computed_tokens
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            # A fully cached prompt recomputes its last token for the logits only: that KV exists.
            slots.append(
                NULL_SLOT if pos < seq.num_reused_tokens else seq.block_table[pos // bs] * bs + pos % bs
            )
            ctx_lens.append(pos + 1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0))
        if decodes:
            self._decode_metadata(meta, [s.seq for s in decodes], ctx_lens)
        # Prompt chunks: many tokens, attending to their cached prefix and causally to themselves.
        offset = len(decodes)
        for s in chunks:
            seq, n = s.seq, s.num_new_tokens
            c = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[c : c + n])
            chunk_pos = torch.arange(c, c + n)
            positions.extend(range(c, c + n))
            table_t = torch.tensor(seq.block_table[: -(-(c + n) // bs)], dtype=torch.long)
            chunk_slots = table_t[chunk_pos // bs] * bs + chunk_pos % bs
            if c < seq.num_reused_tokens:
                chunk_slots[: seq.num_reused_tokens - c] = NULL_SLOT
            slots.extend(chunk_slots.tolist())
            if c == 0:
                span = PrefillSpan(offset, n, 0, None, None)
            else:
                mask = torch.arange(c + n)[None, :] <= chunk_pos[:, None]
                span = PrefillSpan(offset, n, c, table_t, mask)
            meta.prefills.append(span)
            offset += n
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long)
        dev = self.device
        if dev.type != "cpu":
            meta = _to_device(meta, dev)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids_t, pos_t, PagedAttention(self.kv_caches, meta, bs, self.scale))
        return self._logits(hidden, decodes + chunks)

    def _decode_metadata(self, meta: AttentionMetadata, seqs: list[Sequence], ctx_lens: list[int]) -> None:
        bs = self.block_size
        nb = -(-max(ctx_lens) // bs)
        tables = [seq.block_table[:nb] + [NULL_BLOCK] * (nb - len(seq.block_table[:nb])) for seq in seqs]
        meta.num_decode = len(seqs)
        # via numpy: torch.tensor on nested lists costs ~40 ns per page id (~0.3 ms for 128 rows)
        meta.decode_tables = torch.from_numpy(np.array(tables, dtype=np.int64))
        meta.decode_ctx_lens = torch.tensor(ctx_lens, dtype=torch.long)
        meta.decode_kernel = self.decode_kernel
        if self.shared_prefix_attention and len(seqs) > 1:
            starts = self._group_shared_prefixes(meta, tables, ctx_lens)
            if meta.shared is not None:
                meta.decode_starts = torch.tensor(starts, dtype=torch.long)

    def _group_shared_prefixes(
        self, meta: AttentionMetadata, tables: list[list[int]], ctx_lens: list[int]
    ) -> list[int]:
        """Group decode rows by common leading pages; returns each row's own start position.

        Rows sorted by page ids put long common prefixes next to each other; a greedy pass then
        cuts the order into runs: a run's shared length is the minimum adjacent common prefix, a
        drop ends the run, and a rise moves the previous row into a new, deeper run (what it
        saves there, the longer prefix, beats what it saved in the old run). Only pages wholly
        before a row's newest token are shared (the newest token's page is the row's own)."""
        bs, min_pages = self.block_size, self.min_shared_pages
        limit = [(c - 1) // bs for c in ctx_lens]
        order = sorted((i for i in range(len(tables)) if limit[i] >= min_pages), key=lambda i: tables[i])
        groups: list[tuple[list[int], int]] = []
        run: list[int] = []
        shared = 0
        for prev, row in zip(order, order[1:]):
            cap = min(limit[prev], limit[row])
            a, b = tables[prev], tables[row]
            # Forked rows share their whole prefix: one C-level slice compare, else the first miss.
            lcp = cap if a[:cap] == b[:cap] else next(i for i in range(cap) if a[i] != b[i])
            if lcp < min_pages:
                if len(run) > 1:
                    groups.append((run, shared))
                run, shared = [], 0
            elif not run:
                run, shared = [prev, row], lcp
            elif lcp == shared:
                run.append(row)
            elif lcp > shared:
                if len(run) > 2:
                    groups.append((run[:-1], shared))
                run, shared = [prev, row], lcp
            else:
                groups.append((run, shared))
                run, shared = [], 0
        if len(run) > 1:
            groups.append((run, shared))
        starts = [0] * len(tables)
        if not groups:
            return starts
        n = len(tables)
        max_pages = max(sh for _, sh in groups)
        max_members = max(len(r) for r, _ in groups)
        # One tensor per field, built from padded lists (a torch.tensor call per group costs more
        # than the whole grouping).
        pages = torch.tensor(
            [tables[rows[0]][:sh] + [0] * (max_pages - sh) for rows, sh in groups], dtype=torch.long
        )
        lens = torch.tensor([sh * bs for _, sh in groups], dtype=torch.long)
        key_mask = (torch.arange(max_pages * bs)[None, :] >= lens[:, None]).unsqueeze(1)
        rows_t = torch.tensor(
            [rows + [n] * (max_members - len(rows)) for rows, _ in groups], dtype=torch.long
        )
        member_index = [gi * max_members + j for gi, (rows, _) in enumerate(groups) for j in range(len(rows))]
        member_rows = [r for rows, _ in groups for r in rows]
        for rows, sh in groups:
            for r in rows:
                # complete (fused) groups run the row's own keys too: nothing left for the row pass
                starts[r] = ctx_lens[r] if self.shared_fused else sh * bs
        offsets = [0]
        for rows, _ in groups:
            offsets.append(offsets[-1] + len(rows))
        meta.shared = SharedPrefixGroups(
            pages,
            key_mask,
            rows_t,
            torch.tensor(member_index, dtype=torch.long),
            torch.tensor(member_rows, dtype=torch.long),
            lens,
            torch.tensor(offsets, dtype=torch.long),
            kernel=self.shared_kernel,
            fused=self.shared_fused,
            complete=self.shared_fused,
            all_rows=len(member_rows) == n,
        )
        return starts

    def _logits(self, hidden: torch.Tensor, items: list[ScheduledSequence]) -> RunnerOutput:
        """Project the rows that need logits: sampling rows and requested prompt positions."""
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[ScheduledSequence, int, int, int]] = []  # (item, first row, count, start pos)
        row = 0
        for s in items:
            seq, n = s.seq, s.num_new_tokens
            if s.samples:
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
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=dev)])
        prompt_logits = [
            PromptLogitsChunk(s.seq, start, self.model.compute_logits(hidden[r0 : r0 + cnt]))
            for s, r0, cnt, start in prompt_rows
        ]
        return RunnerOutput(sample_seqs, logits, prompt_logits)


def _kernel_supports(cfg: ModelConfig) -> bool:
    from forkllm.kernels import ops

    mod = ops()
    return mod is not None and bool(
        mod.paged_decode_supports(cfg.head_dim, cfg.num_heads // cfg.num_kv_heads)
    )


def _fused_shared_supports(cfg: ModelConfig) -> bool:
    from forkllm.kernels import ops

    mod = ops()
    return mod is not None and bool(mod.shared_prefix_supported(cfg.head_dim))


def _to_device(meta: AttentionMetadata, dev: torch.device) -> AttentionMetadata:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev, non_blocking=True)

    meta.slot_mapping = meta.slot_mapping.to(dev)
    meta.decode_tables = mv(meta.decode_tables)
    meta.decode_ctx_lens = mv(meta.decode_ctx_lens)
    meta.decode_starts = mv(meta.decode_starts)
    if meta.shared is not None:
        g = meta.shared
        meta.shared = SharedPrefixGroups(
            g.pages.to(dev),
            g.key_mask.to(dev),
            g.rows.to(dev),
            g.member_index.to(dev),
            g.member_rows.to(dev),
            g.lens.to(dev),
            g.offsets.to(dev),
            kernel=False,
        )
    for p in meta.prefills:
        p.block_ids, p.mask = mv(p.block_ids), mv(p.mask)
    return meta
