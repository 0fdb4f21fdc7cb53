"""ModelRunner: owns the KV tensors, packs a scheduled batch into flat tensors, runs the model once.

Returns logits only for the rows that need them: the last token of every sequence that samples
this step, plus prompt positions of requests that asked for prompt_logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from forkllm.attention.paged import AttentionMetadata, PagedAttention, PrefillSpan
from forkllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from forkllm.engine.sequence import Sequence
from forkllm.kv.block_pool import NULL_BLOCK
from forkllm.models.config import ModelConfig
from forkllm.models.llama import LlamaForCausalLM


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
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        shape = (2, config.num_kv_heads, num_blocks * block_size, config.head_dim)
        # torch.empty: pages are zeroed lazily on first use (see kv.block_pool).
        self.kv_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.zero_blocks([NULL_BLOCK])
        self.scale = config.head_dim**-0.5
        self.decode_kernel = device.type == "cpu" and _kernel_supports(config)
        if device.type == "cpu":
            from forkllm.kernels import ops

            model.use_cpu_kernels(ops())

    def zero_blocks(self, blocks: list[int]) -> None:
        if not blocks:
            return
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            cache.view(2, cache.shape[1], self.num_blocks, -1).index_fill_(2, idx, 0)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        # Decodes (one query each) first, then multi-token chunks: the layout PagedAttention expects.
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        chunks = [s for s in sched.scheduled if s.num_new_tokens != 1]

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        # Decodes: one token each, at position num_computed_tokens.
        ctx_lens: list[int] = []
        for s in decodes:
            seq = s.seq
            pos = seq.num_computed_tokens
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            ctx_lens.append(pos + 1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0))
        if decodes:
            nb = -(-max(ctx_lens) // bs)
            table = [
                seq.block_table[:nb] + [NULL_BLOCK] * (nb - len(seq.block_table[:nb]))
                for seq in (s.seq for s in decodes)
            ]
            meta.num_decode = len(decodes)
            meta.decode_tables = torch.tensor(table, dtype=torch.long)
            meta.decode_ctx_lens = torch.tensor(ctx_lens, dtype=torch.long)
            meta.decode_kernel = self.decode_kernel
            if not self.decode_kernel:
                lens = meta.decode_ctx_lens
                meta.decode_mask = (torch.arange(nb * bs)[None, :] >= lens[:, None]).unsqueeze(1)
        # Prompt chunks: many tokens, attending to their cached prefix and causally to themselves.
        offset = len(decodes)
        for s in chunks:
            seq, n = s.seq, s.num_new_tokens
            c = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[c : c + n])
            chunk_pos = torch.arange(c, c + n)
            positions.extend(range(c, c + n))
            table_t = torch.tensor(seq.block_table[: -(-(c + n) // bs)], dtype=torch.long)
            slots.extend((table_t[chunk_pos // bs] * bs + chunk_pos % bs).tolist())
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

        # Rows to project onto the vocabulary.
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[ScheduledSequence, int, int, int]] = []  # (item, first row, count, start pos)
        row = 0
        for s in decodes + chunks:
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


def _to_device(meta: AttentionMetadata, dev: torch.device) -> AttentionMetadata:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev, non_blocking=True)

    meta.slot_mapping = meta.slot_mapping.to(dev)
    meta.decode_tables = mv(meta.decode_tables)
    meta.decode_ctx_lens = mv(meta.decode_ctx_lens)
    meta.decode_mask = mv(meta.decode_mask)
    for p in meta.prefills:
        p.block_ids, p.mask = mv(p.block_ids), mv(p.mask)
    return meta
