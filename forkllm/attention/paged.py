"""Paged attention in PyTorch: the base backend, and the per-step context the model calls.

KV cache layout, one tensor per layer: [2, num_kv_heads, num_blocks * block_size, head_dim].
Head-major means the pages of one sequence, gathered with a single `index_select` over the block
axis, come out as one contiguous [kv_heads, seq, tokens, head_dim] tensor.

`TorchAttention` works on any device and dtype. The other backends (attention/cpu.py,
attention/shared_prefix.py) derive from it and replace the cache write, the decode rows or the
decode step as a whole; which one runs is decided once at start-up (attention/backend.py), so a
layer's call takes one straight path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from forkllm.attention.metadata import (
    PAD_PAGE,
    AttentionBatch,
    AttentionMetadata,
    KeySegment,
    PrefillSpan,
    metadata_to,
)
from forkllm.kernels import PagedDecodeRows

KvWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
__all__ = ["AttentionMetadata", "AttentionStep", "PagedAttention", "PrefillSpan", "TorchAttention"]


def index_copy_kv(cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The step's keys and values [T, Hkv, D] into their cache slots."""
    cache[0].index_copy_(1, slots, k.transpose(0, 1))
    cache[1].index_copy_(1, slots, v.transpose(0, 1))


class TorchAttention:
    """Per-row paged attention in PyTorch: each decode row gathers its pages and attends with two
    matmuls; prefill chunks use SDPA."""

    def __init__(
        self,
        block_size: int,
        scale: float,
        device: torch.device | None = None,
        write_kv: KvWriter = index_copy_kv,
    ) -> None:
        self.block_size = block_size
        self.scale = scale
        self.device = device if device is not None else torch.device("cpu")
        self.write_kv = write_kv  # a plain callable attribute: the C++ write where kernels run
        # Set by the runner (models.rope.rerotate on the model's tables): rotates queries [n, h, d]
        # by per-row position shifts, for shared-cache workers.
        self.shift_queries: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # ---- metadata (once per step) ---------------------------------------------------------------
    def build_metadata(self, batch: AttentionBatch) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=batch.slot_mapping)
        segments = batch.decode_segments
        if batch.decode_ctx_lens and segments is not None and any(s is not None for s in segments):
            self._segment_metadata(meta, batch, segments)
        elif batch.decode_ctx_lens:
            self._decode_metadata(meta, batch.decode_block_tables, batch.decode_ctx_lens)
        offset = len(batch.decode_ctx_lens)
        for chunk in batch.chunks:
            c, n = chunk.num_cached, chunk.num_new
            if c == 0:
                assert chunk.key_valid is None, "a sequence with holes has cached tokens"
                span = PrefillSpan(offset, n, 0, None, None)
            else:
                mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]
                if chunk.key_valid is not None:
                    mask &= chunk.key_valid[None, :]
                span = PrefillSpan(offset, n, c, chunk.block_ids, mask)
            meta.prefills.append(span)
            offset += n
        return meta if self.device.type == "cpu" else metadata_to(meta, self.device)

    def _decode_metadata(
        self, meta: AttentionMetadata, block_tables: Sequence[list[int]], ctx_lens: list[int]
    ) -> list[list[int]]:
        """Fills the decode fields of `meta`; returns the padded page tables as lists."""
        nb = -(-max(ctx_lens) // self.block_size)
        tables = [t[:nb] + [PAD_PAGE] * (nb - len(t[:nb])) for t in block_tables]
        meta.num_decode = len(tables)
        # via numpy: torch.tensor on nested lists costs ~40 ns per page id (~0.3 ms for 128 rows)
        meta.decode_tables = torch.from_numpy(np.array(tables, dtype=np.int64))
        meta.decode_ctx_lens = torch.tensor(ctx_lens, dtype=torch.long)
        return tables

    def _segment_metadata(
        self, meta: AttentionMetadata, batch: AttentionBatch, segments: list[list[KeySegment] | None]
    ) -> None:
        """One decode row per key segment (a row without segments is one segment [0, ctx)); no
        shared-prefix groups this step (steps with joined threads or workers decoding are rare)."""
        tables: list[list[int]] = []
        starts: list[int] = []
        ends: list[int] = []
        query: list[int] = []
        shifts: list[int] = []
        for i, (table, ctx) in enumerate(zip(batch.decode_block_tables, batch.decode_ctx_lens)):
            for seg in segments[i] or [KeySegment(0, ctx)]:
                tables.append(table if seg.table is None else seg.table)
                starts.append(seg.start)
                ends.append(seg.end)
                query.append(i)
                shifts.append(seg.q_shift)
        TorchAttention._decode_metadata(self, meta, tables, ends)
        meta.num_decode = len(batch.decode_ctx_lens)
        meta.decode_starts = torch.tensor(starts, dtype=torch.long)
        meta.segment_query = torch.tensor(query, dtype=torch.long)
        if any(shifts):
            meta.segment_q_shift = torch.tensor(shifts, dtype=torch.long)

    def row_backend(self) -> TorchAttention:
        """What attends decode rows one by one (a shared-prefix backend delegates)."""
        return self

    def rows_on_kernel(self) -> bool:
        """Whether a decode row that is in no shared-prefix group and has no key segments attends
        through the C++ paged kernel, its keys written by the C++ cache write (attention/cpu.py)."""
        return False

    def decode_segments(self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode queries q [num_decode, hq, d] over their key segments: each segment row's
        (out, lse), merged per query (softmax over a union = the lse-weighted mix of its parts)."""
        sq = meta.segment_query
        assert sq is not None
        qx = q.index_select(0, sq)
        if meta.segment_q_shift is not None:
            assert self.shift_queries is not None, "a shifted query needs the model's rotary tables"
            qx = self.shift_queries(qx, meta.segment_q_shift)
        out, lse = self.row_backend().decode_rows(cache, qx.contiguous(), meta, want_lse=True)
        assert lse is not None
        n = q.shape[0]
        top = torch.full((n, lse.shape[1]), float("-inf"), device=q.device)
        top.scatter_reduce_(0, sq[:, None].expand_as(lse), lse, "amax")
        w = torch.exp(lse - top.index_select(0, sq))
        num = torch.zeros((n, *out.shape[1:]), dtype=torch.float32, device=q.device)
        num.index_add_(0, sq, w[..., None] * out.float())
        den = torch.zeros_like(top).index_add_(0, sq, w)
        return (num / den[..., None]).to(q.dtype)

    def context(self, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> AttentionStep:
        """What the model calls every layer this step (models.llama.AttentionContext)."""
        return AttentionStep(self, kv_caches, meta)

    # ---- decode ---------------------------------------------------------------------------------
    def decode(self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of the step's decode rows q [num_decode, Hq, D] (their keys already written)."""
        return self.decode_rows(cache, q, meta, want_lse=False)[0]

    def decode_rows(
        self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata, want_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row over its own keys [start, ctx): (out [n, hq, d], lse [n, hq] or None)."""
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        n, hq, d = q.shape
        hkv = cache.shape[1]
        group = hq // hkv
        nb = meta.decode_tables.shape[1]
        pages = cache.view(2, hkv, -1, self.block_size * d).index_select(2, meta.decode_tables.view(-1))
        kv = pages.view(2, hkv, n, nb * self.block_size, d)
        pos = torch.arange(nb * self.block_size, device=q.device)[None, :]
        masked = pos >= meta.decode_ctx_lens[:, None]
        if meta.decode_starts is not None:
            masked |= pos < meta.decode_starts[:, None]
        qh = q.view(n, hkv, group, d).transpose(0, 1)  # [hkv, n, group, d]
        scores = torch.matmul(qh, kv[0].transpose(-1, -2)).float()  # [hkv, n, group, tokens]
        scores.mul_(self.scale).masked_fill_(masked[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [hkv, n, group]
        probs = torch.exp(scores - lse[..., None]).to(q.dtype)
        out = torch.matmul(probs, kv[1]).transpose(0, 1).reshape(n, hq, d)
        return out, (lse.permute(1, 0, 2).reshape(n, hq) if want_lse else None)

    # ---- prefill --------------------------------------------------------------------------------
    def prefill(
        self, cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, hq, n, d]
        if span.ctx_len == 0:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True
            )
        else:
            assert span.block_ids is not None
            hkv, d = cache.shape[1], cache.shape[3]
            total = span.ctx_len + span.q_len
            pages = cache.view(2, hkv, -1, self.block_size * d).index_select(2, span.block_ids)
            kv = pages.view(2, hkv, -1, d)[:, :, :total].unsqueeze(1)  # [2, 1, hkv, total, d]
            out = F.scaled_dot_product_attention(
                qh, kv[0], kv[1], attn_mask=span.mask, scale=self.scale, enable_gqa=True
            )
        return out[0].transpose(0, 1)


class AttentionStep:
    """One step's attention context handed to the model (implements models.llama.AttentionContext):
    the backend, the caches and the step's metadata."""

    def __init__(self, backend: TorchAttention, kv_caches: list[torch.Tensor], meta: AttentionMetadata):
        self.backend = backend
        self.kv_caches = kv_caches
        self.meta = meta

    def paged_rows(self) -> PagedDecodeRows | None:
        """This step as plain paged decode rows, when that is all it is (else None): then the
        model may run every layer's cache write and attention inside one kernel call."""
        meta, backend = self.meta, self.backend
        if (
            meta.num_decode == 0
            or meta.prefills
            or meta.shared is not None
            or meta.segment_query is not None
            or not backend.rows_on_kernel()
        ):
            return None
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        return PagedDecodeRows(
            self.kv_caches,
            meta.slot_mapping,
            meta.decode_tables,
            meta.decode_starts,
            meta.decode_ctx_lens,
            backend.block_size,
            backend.scale,
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, backend = self.meta, self.backend
        cache = self.kv_caches[layer]
        backend.write_kv(cache, meta.slot_mapping, k, v)
        nd = meta.num_decode
        decode = backend.decode_segments if meta.segment_query is not None else backend.decode
        if nd == q.shape[0]:
            return decode(cache, q, meta)
        if nd == 0 and len(meta.prefills) == 1:
            return backend.prefill(cache, q, k, v, meta.prefills[0])
        out = torch.empty_like(q)
        if nd:
            out[:nd] = decode(cache, q[:nd], meta)
        for span in meta.prefills:
            s = slice(span.q_start, span.q_start + span.q_len)
            out[s] = backend.prefill(cache, q[s], k[s], v[s], span)
        return out


class PagedAttention(AttentionStep):
    """A step context on the PyTorch backend, for callers that build their metadata by hand."""

    def __init__(self, kv_caches: list[torch.Tensor], meta: AttentionMetadata, block_size: int, scale: float):
        device = kv_caches[0].device if kv_caches else None
        super().__init__(TorchAttention(block_size, scale, device), kv_caches, meta)
