"""Shared-prefix decode (Hydragen / cascade attention).

Decode rows whose block tables start with the same pages (forked samples, requests sharing a
system prompt) form a group (attention/grouping.py). Attention over the shared pages is one
batched matmul for all the group's queries, each sequence attends to the rest of its own pages
separately, and the two partial results merge exactly through their log-sum-exps: softmax over a
union of key sets is the lse-weighted mix of the parts.

Three backends, one chosen at start-up:
- `SharedPrefixAttention`: gather + matmuls, softmax and merge in PyTorch (any device, any dtype);
- `CpuSharedPrefixAttention`: the same matmuls with the C++ softmax and merge kernels around them;
- `FusedSharedPrefixAttention`: one C++ kernel (bf16, AVX512-BF16) reads the shared pages in place,
  then each member's own keys, and writes final outputs (no merge); the per-row kernel only sees
  ungrouped rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forkllm.attention.cpu import CpuKernelAttention
from forkllm.attention.grouping import group_shared_prefixes, pack_groups
from forkllm.attention.metadata import AttentionMetadata, SharedPrefixGroups
from forkllm.attention.paged import TorchAttention
from forkllm.kernels import KernelOps


def add_groups(
    meta: AttentionMetadata,
    tables: list[list[int]],
    ctx_lens: list[int],
    block_size: int,
    min_pages: int,
    own_keys_in_group: bool,
) -> None:
    """Groups the decode rows of `meta` and sets each grouped row's own start: past the shared
    pages, or its context end when the group's kernel also attends the row's own keys."""
    if len(tables) < 2:
        return
    groups = group_shared_prefixes(tables, ctx_lens, block_size, min_pages)
    if not groups:
        return
    meta.shared = pack_groups(groups, tables, block_size, len(tables))
    starts = [0] * len(tables)
    for g in groups:
        for r in g.rows:
            starts[r] = ctx_lens[r] if own_keys_in_group else g.num_pages * block_size
    meta.decode_starts = torch.tensor(starts, dtype=torch.long)


class SharedPrefixAttention(TorchAttention):
    """Grouped rows attend to their shared pages with two batched matmuls (oneDNN's GEMMs run
    several times the FMA rate of per-row attention code) and to their own keys through `rows`;
    softmax and merge in PyTorch."""

    def __init__(self, rows: TorchAttention, min_shared_pages: int) -> None:
        super().__init__(rows.block_size, rows.scale, rows.device, rows.write_kv)
        self.rows = rows  # attends each row's own keys
        self.min_shared_pages = min_shared_pages

    def row_backend(self) -> TorchAttention:
        return self.rows

    def rows_on_kernel(self) -> bool:
        return self.rows.rows_on_kernel()

    def _decode_metadata(
        self, meta: AttentionMetadata, block_tables: Sequence[list[int]], ctx_lens: list[int]
    ) -> list[list[int]]:
        tables = super()._decode_metadata(meta, block_tables, ctx_lens)
        add_groups(meta, tables, ctx_lens, self.block_size, self.min_shared_pages, own_keys_in_group=False)
        return tables

    def decode(self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        shared = meta.shared
        if shared is None:
            return self.rows.decode_rows(cache, q, meta, want_lse=False)[0]
        out, lse = self.rows.decode_rows(cache, q, meta, want_lse=True)
        assert lse is not None
        p_out, p_lse = self._shared_pages(cache, q, shared)
        return self._merge(out, lse, shared.member_rows, p_out, p_lse)

    def _shared_pages(
        self, cache: torch.Tensor, q: torch.Tensor, g: SharedPrefixGroups
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every grouped row over its group's shared pages, as two batched matmuls over
        the gathered pages. Returns (out [members, hq, d], lse [members, hq]) in member order."""
        n, hq, d = q.shape
        hkv = cache.shape[1]
        group = hq // hkv
        ng, mmax = g.rows.shape
        rows = mmax * group
        keys = g.pages.shape[1] * self.block_size
        pages = cache.view(2, hkv, -1, self.block_size * d).index_select(2, g.pages.view(-1))
        kv = pages.view(2, hkv * ng, keys, d)
        q_pad = torch.cat([q * self.scale, q.new_zeros(1, hq, d)])[g.rows]  # [ng, mmax, hq, d]
        qg = q_pad.view(ng, mmax, hkv, group, d).permute(2, 0, 1, 3, 4).reshape(hkv * ng, rows, d)
        scores = torch.bmm(qg, kv[0].transpose(1, 2))  # [hkv*ng, rows, keys]
        probs, lse = self._softmax(scores, g, hkv, q.dtype)
        out = torch.bmm(probs, kv[1])  # [hkv*ng, rows, d]
        out = out.view(hkv, ng, mmax, group, d).permute(1, 2, 0, 3, 4).reshape(ng * mmax, hq, d)
        lse = lse.reshape(hkv, ng, mmax, group).permute(1, 2, 0, 3).reshape(ng * mmax, hq)
        return out[g.member_index], lse[g.member_index]

    def _softmax(
        self, scores: torch.Tensor, g: SharedPrefixGroups, hkv: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [hkv*groups, rows, keys] -> (probabilities of `dtype`, lse), padding keys masked."""
        ng = g.rows.shape[0]
        rows, keys = scores.shape[1], scores.shape[2]
        scores = scores.float().view(hkv, ng, rows, keys).masked_fill_(g.key_mask[None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).to(dtype).view(hkv * ng, rows, keys)
        return probs, lse

    def _merge(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        rows: torch.Tensor,
        p_out: torch.Tensor,
        p_lse: torch.Tensor,
    ) -> torch.Tensor:
        """Rows `rows` of the own-key result (out, lse) merged with the shared-page result."""
        s_out, s_lse = out[rows].float(), lse[rows]
        m = torch.maximum(p_lse, s_lse)
        wp, ws = torch.exp(p_lse - m), torch.exp(s_lse - m)
        merged = (wp[..., None] * p_out.float() + ws[..., None] * s_out) / (wp + ws)[..., None]
        out[rows] = merged.to(out.dtype)
        return out


class CpuSharedPrefixAttention(SharedPrefixAttention):
    """The matmul path with the C++ softmax (in place on the scores) and merge kernels, own keys by
    the per-row kernel: for caches the fused kernel does not take (float32, other head sizes)."""

    def __init__(self, rows: CpuKernelAttention, min_shared_pages: int) -> None:
        super().__init__(rows, min_shared_pages)
        self.ops = rows.ops

    def _softmax(
        self, scores: torch.Tensor, g: SharedPrefixGroups, hkv: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return scores, self.ops.softmax_lse_(scores, g.lens.repeat(hkv))

    def _merge(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        rows: torch.Tensor,
        p_out: torch.Tensor,
        p_lse: torch.Tensor,
    ) -> torch.Tensor:
        self.ops.merge_attention_(out, lse, rows, p_out.contiguous(), p_lse.contiguous())
        return out


class FusedSharedPrefixAttention(CpuKernelAttention):
    """Grouped rows in one fused C++ kernel call per layer (shared pages, then own keys); ungrouped
    rows through the per-row kernel. Chosen when `Kernels.shared_prefix_fused` holds."""

    def __init__(self, ops: KernelOps, block_size: int, scale: float, min_shared_pages: int) -> None:
        super().__init__(ops, block_size, scale)
        self.min_shared_pages = min_shared_pages

    def _decode_metadata(
        self, meta: AttentionMetadata, block_tables: Sequence[list[int]], ctx_lens: list[int]
    ) -> list[list[int]]:
        tables = super()._decode_metadata(meta, block_tables, ctx_lens)
        add_groups(meta, tables, ctx_lens, self.block_size, self.min_shared_pages, own_keys_in_group=True)
        return tables

    def decode(self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        shared = meta.shared
        if shared is None:
            return self.decode_rows(cache, q, meta, want_lse=False)[0]
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        q = q.contiguous()
        # Grouped rows start at their context end: the per-row pass leaves them to the fused kernel.
        out = torch.empty_like(q) if shared.all_rows else self.decode_rows(cache, q, meta, want_lse=False)[0]
        self.ops.shared_prefix_decode_(
            out,
            q,
            cache[0],
            cache[1],
            shared.pages,
            shared.lens,
            shared.member_rows,
            shared.offsets,
            meta.decode_tables,
            meta.decode_ctx_lens,
            self.block_size,
            self.scale,
        )
        return out
