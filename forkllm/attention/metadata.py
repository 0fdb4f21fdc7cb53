"""The records crossing the runner / attention edge.

In: `AttentionBatch`, what the runner knows of a step (slots, decode rows' page tables and context
lengths, prefill chunks). Out: `AttentionMetadata`, the tensors a backend built from it once per
step, read by every layer.

A step's flat batch is ordered decodes first (one query each), then prefill chunks (each attends
to its cached prefix plus itself, causally).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

PAD_PAGE = 0  # kv.block_pool.NULL_BLOCK: pads page tables, never one of a sequence's pages


@dataclass(frozen=True)
class PrefillChunk:
    """One multi-token chunk of a sequence, as the runner scheduled it."""

    num_cached: int  # tokens of the sequence already in the cache before the chunk
    num_new: int
    block_ids: torch.Tensor  # pages covering [0, num_cached + num_new)
    # bool [num_cached + num_new]: False at slots holding no token (a page-joined thread's holes)
    key_valid: torch.Tensor | None = None


@dataclass(frozen=True)
class KeySegment:
    """A run of keys one decode query attends: slots [start, end) of its own pages, or of
    `table` (a shared-cache peer's pages); `q_shift` rotates the query by that many positions
    for these keys (their place in this query's view differs from where they were written)."""

    start: int
    end: int
    table: list[int] | None = None
    q_shift: int = 0


@dataclass(frozen=True)
class AttentionBatch:
    """A step as the runner packed it, decode rows first."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of every token in the batch
    decode_block_tables: Sequence[list[int]]  # each decode row's block table (pages past its context ignored)
    decode_ctx_lens: list[int]  # keys each decode query sees (its own token included)
    chunks: list[PrefillChunk] = field(default_factory=list)
    # Per decode row, the key segments it attends (a page-joined thread's holes left out, a
    # shared-cache worker's peers added); None (or a row's None) = all of [0, ctx_len).
    decode_segments: list[list[KeySegment] | None] | None = None


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

    pages: torch.Tensor  # [groups, max_pages] shared page ids, padded with PAD_PAGE
    key_mask: torch.Tensor  # bool [groups, 1, max_pages * block_size]: True = padding key
    rows: torch.Tensor  # [groups, max_members] decode row of each member; padding = num_decode
    member_index: torch.Tensor  # [members] flat index into groups * max_members of real members
    member_rows: torch.Tensor  # [members] their decode rows, group after group
    lens: torch.Tensor  # [groups] shared tokens
    offsets: torch.Tensor  # [groups + 1] where each group's members start in member_rows
    all_rows: bool = False  # every decode row is grouped: no per-row pass at all


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every token in the batch
    num_decode: int = 0  # the first num_decode tokens are single-query sequences
    decode_tables: torch.Tensor | None = None  # [num_decode, decode_blocks] page tables, PAD_PAGE padded
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] keys each decode query sees
    decode_starts: torch.Tensor | None = None  # [num_decode] first key each row attends on its own
    shared: SharedPrefixGroups | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Segmented decode: the decode fields above describe one row per key segment, and
    # segment_query [rows] is the decode query (< num_decode) each segment row belongs to.
    segment_query: torch.Tensor | None = None
    segment_q_shift: torch.Tensor | None = None  # [rows] query rotation per segment row; None: all 0


def metadata_to(meta: AttentionMetadata, dev: torch.device) -> AttentionMetadata:
    """The same metadata with every tensor on `dev` (built on the CPU, used on an accelerator)."""

    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev, non_blocking=True)

    meta.slot_mapping = meta.slot_mapping.to(dev)
    meta.decode_tables = mv(meta.decode_tables)
    meta.decode_ctx_lens = mv(meta.decode_ctx_lens)
    meta.decode_starts = mv(meta.decode_starts)
    meta.segment_query = mv(meta.segment_query)
    meta.segment_q_shift = mv(meta.segment_q_shift)
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
            all_rows=g.all_rows,
        )
    for p in meta.prefills:
        p.block_ids, p.mask = mv(p.block_ids), mv(p.mask)
    return meta
