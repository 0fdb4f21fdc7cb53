"""Paged attention in plain PyTorch (CPU, and a correct fallback on CUDA).

KV cache layout, one tensor per layer: [2, num_kv_heads, num_blocks * block_size, head_dim].
Head-major means the pages of one sequence, gathered with a single `index_select` over the block
axis, come out as one contiguous [kv_heads, seq, tokens, head_dim] tensor: batched matmuls read
it without a further copy.

A step's flat batch is ordered decodes first (one query each, attended in one batched call over
padded block tables), then prefill chunks (each attends to its cached prefix plus itself,
causally).
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
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every token in the batch
    num_decode: int = 0  # the first num_decode tokens are single-query sequences
    decode_tables: torch.Tensor | None = None  # [num_decode, decode_blocks] page tables padded with page 0
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] keys each decode query sees
    decode_mask: torch.Tensor | None = None  # bool [num_decode, 1, decode_blocks * block_size], True = masked
    decode_kernel: bool = False  # use the C++ kernel (reads pages in place) instead of gather + matmul
    prefills: list[PrefillSpan] = field(default_factory=list)


class PagedAttention:
    """Per-step attention context handed to the model (implements models.llama.AttentionContext)."""

    def __init__(self, kv_caches: list[torch.Tensor], meta: AttentionMetadata, block_size: int, scale: float):
        self.kv_caches = kv_caches
        self.meta = meta
        self.block_size = block_size
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        cache = self.kv_caches[layer]
        slots = meta.slot_mapping
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

    def _decode(self, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        if meta.decode_kernel:
            kernels = ops()
            assert kernels is not None
            return kernels.paged_decode(
                q.contiguous(),
                cache[0],
                cache[1],
                meta.decode_tables,
                meta.decode_ctx_lens,
                self.block_size,
                self.scale,
            )
        assert meta.decode_mask is not None
        n, hq, d = q.shape
        hkv = cache.shape[1]
        group = hq // hkv
        nb = meta.decode_tables.shape[1]
        pages = cache.view(2, hkv, -1, self.block_size * d).index_select(2, meta.decode_tables.view(-1))
        kv = pages.view(2, hkv, n, nb * self.block_size, d)
        qh = q.view(n, hkv, group, d).transpose(0, 1)  # [hkv, n, group, d]
        scores = torch.matmul(qh, kv[0].transpose(-1, -2)).float()  # [hkv, n, group, tokens]
        scores.mul_(self.scale).masked_fill_(meta.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, kv[1])  # [hkv, n, group, d]
        return out.transpose(0, 1).reshape(n, hq, d)

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
