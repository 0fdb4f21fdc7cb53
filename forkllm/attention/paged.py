"""Paged attention in PyTorch plus the optional C++ decode kernel (CPU), with shared-prefix decode.

KV cache layout, one tensor per layer: [2, num_kv_heads, num_blocks * block_size, head_dim].
Head-major means the pages of one sequence, gathered with a single `index_select` over the block
axis, come out as one contiguous [kv_heads, seq, tokens, head_dim] tensor.

A step's flat batch is ordered decodes first (one query each), then prefill chunks (each attends
to its cached prefix plus itself, causally).

Shared-prefix decode (Hydragen / cascade attention): decode rows whose block tables start with the
same pages (forked samples, requests sharing a system prompt) form a group. Attention over the
shared pages is one batched matmul for all the group's queries, each sequence attends to the rest
of its own pages separately, and the two partial results merge exactly through their
log-sum-exps: softmax over a union of key sets is the lse-weighted mix of the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forkllm.kernels import ops


@dataclass
class PrefillSpan:
    """One multi-token chunk of a sequence inside the flat batch."""

    q_start: int
    q_len: int
    ctx_len: int  # tokens of this sequence already in the cache before the chunk
    block_ids: torch.Tensor | None  # pages covering [0, ctx_len + q_len); None when ctx_len == 0
    mask: torch.Tensor | None  # bool [q_len, ctx_len + q_len] (True = attend); None when ctx_len == 0


@dataclass
class SharedPrefixGroups:
    """Decode rows grouped by a common run of leading pages (all groups padded to one shape)."""

    pages: torch.Tensor  # [groups, max_pages] shared page ids, padded with page 0
    key_mask: torch.Tensor  # bool [groups, 1, max_pages * block_size]: True = padding key
    rows: torch.Tensor  # [groups, max_members] decode row of each member; padding = num_decode
    member_index: torch.Tensor  # [members] flat index into groups * max_members of real members
    member_rows: torch.Tensor  # [members] their decode rows, group after group
    lens: torch.Tensor  # [groups] shared tokens
    offsets: torch.Tensor  # [groups + 1] where each group's members start in member_rows
    kernel: bool = False  # C++ softmax and merge kernels around the gather + matmul path
    fused: bool = False  # one C++ kernel (bf16, AVX512-BF16) reading the shared pages in place
    # The fused kernel also runs each member's own keys and writes final outputs (no merge); the
    # per-row decode kernel then only sees ungrouped rows (grouped rows start at their context end).
    complete: bool = False
    all_rows: bool = False  # every decode row is grouped: no per-row pass at all


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every token in the batch
    num_decode: int = 0  # the first num_decode tokens are single-query sequences
    decode_tables: torch.Tensor | None = None  # [num_decode, decode_blocks] page tables padded with page 0
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] keys each decode query sees
    decode_starts: torch.Tensor | None = None  # [num_decode] first key each row attends on its own
    decode_kernel: bool = False  # use the C++ kernel (reads pages in place) instead of gather + matmul
    shared: SharedPrefixGroups | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)


class PagedAttention:
    """Per-step attention context handed to the model (implements models.llama.AttentionContext)."""

    def __init__(self, kv_caches: list[torch.Tensor], meta: AttentionMetadata, block_size: int, scale: float):
        self.kv_caches = kv_caches
        self.meta = meta
        self.block_size = block_size
        self.scale = scale
        # Looked up once per step, not per layer; None on GPUs or when the kernels are off.
        self.kernels = ops() if kv_caches and kv_caches[0].device.type == "cpu" else None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        cache = self.kv_caches[layer]
        slots = meta.slot_mapping
        if self.kernels is not None:
            self.kernels.kv_write_(cache, slots, k, v)
        else:
            cache[0].index_copy_(1, slots, k.transpose(0, 1))
            cache[1].index_copy_(1, slots, v.transpose(0, 1))
        nd = meta.num_decode
        if nd == q.shape[0]:
            return self._decode(cache, q)
        if nd == 0 and len(meta.prefills) == 1:
            return self._prefill(cache, q, k, v, meta.prefills[0])
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(cache, q[:nd])
        for span in meta.prefills:
            s = slice(span.q_start, span.q_start + span.q_len)
            out[s] = self._prefill(cache, q[s], k[s], v[s], span)
        return out

    # ---- decode -------------------------------------------------------------------------------
    def _decode(self, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        shared = meta.shared
        if shared is not None and shared.complete:
            assert self.kernels is not None and meta.decode_tables is not None
            q = q.contiguous()
            out = torch.empty_like(q) if shared.all_rows else self._decode_own(cache, q, want_lse=False)[0]
            self.kernels.shared_prefix_decode_(
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
        out, lse = self._decode_own(cache, q, want_lse=shared is not None)
        if shared is None:
            return out
        assert lse is not None
        p_out, p_lse = self._shared_prefix(cache, q, shared)
        rows = shared.member_rows
        kernels = self.kernels if shared.kernel else None
        if kernels is not None:
            kernels.merge_attention_(out, lse, rows, p_out.contiguous(), p_lse.contiguous())
            return out
        s_out, s_lse = out[rows].float(), lse[rows]
        m = torch.maximum(p_lse, s_lse)
        wp, ws = torch.exp(p_lse - m), torch.exp(s_lse - m)
        merged = (wp[..., None] * p_out.float() + ws[..., None] * s_out) / (wp + ws)[..., None]
        out[rows] = merged.to(out.dtype)
        return out

    def _decode_own(
        self, cache: torch.Tensor, q: torch.Tensor, want_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row over its own keys [start, ctx): (out [n, hq, d], lse [n, hq] or None)."""
        meta = self.meta
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        if meta.decode_kernel:
            kernels = self.kernels
            assert kernels is not None
            res = kernels.paged_decode(
                q.contiguous(),
                cache[0],
                cache[1],
                meta.decode_tables,
                meta.decode_starts,
                meta.decode_ctx_lens,
                self.block_size,
                self.scale,
                want_lse,
            )
            return res[0], (res[1] if want_lse else None)
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

    def _shared_prefix(
        self, cache: torch.Tensor, q: torch.Tensor, g: SharedPrefixGroups
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every grouped row over its group's shared pages: the fused bf16 kernel
        where compiled in, else two batched matmuls over the gathered pages (oneDNN's GEMMs run
        several times the FMA rate of per-row attention code).
        Returns (out [members, hq, d], lse [members, hq]) in member order."""
        if g.fused:
            kernels = self.kernels
            assert kernels is not None
            out, lse = kernels.shared_prefix_attention(
                q.contiguous(),
                cache[0],
                cache[1],
                g.pages,
                g.lens,
                g.member_rows,
                g.offsets,
                self.block_size,
                self.scale,
            )
            return out, lse
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
        kernels = self.kernels if g.kernel else None
        if kernels is not None:
            lse = kernels.softmax_lse_(scores, g.lens.repeat(hkv))
            probs = scores
        else:
            scores = scores.float().view(hkv, ng, rows, keys).masked_fill_(g.key_mask[None], float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[..., None]).to(q.dtype).view(hkv * ng, rows, keys)
        out = torch.bmm(probs, kv[1])  # [hkv*ng, rows, d]
        out = out.view(hkv, ng, mmax, group, d).permute(1, 2, 0, 3, 4).reshape(ng * mmax, hq, d)
        lse = lse.reshape(hkv, ng, mmax, group).permute(1, 2, 0, 3).reshape(ng * mmax, hq)
        return out[g.member_index], lse[g.member_index]

    # ---- prefill ------------------------------------------------------------------------------
    def _prefill(
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
