"""Shared-prefix grouping: which decode rows read the same leading pages (forked samples,
requests sharing a system prompt), so their attention over those pages runs once per group.

`group_shared_prefixes` is pure (page tables in, groups out); `pack_groups` turns its groups into
the padded tensors the shared-prefix backends read every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forkllm.attention.metadata import PAD_PAGE, SharedPrefixGroups


@dataclass(frozen=True)
class PrefixGroup:
    """Decode rows (in page-id order) whose tables start with the same `num_pages` pages."""

    rows: list[int]
    num_pages: int


def group_shared_prefixes(
    tables: Sequence[list[int]], ctx_lens: Sequence[int], block_size: int, min_pages: int
) -> list[PrefixGroup]:
    """Group decode rows by common leading pages; rows sharing fewer than `min_pages` stay out.

    Rows sorted by page ids put long common prefixes next to each other; a greedy pass then
    cuts the order into runs: a run's shared length is the minimum adjacent common prefix, a
    drop ends the run, and a rise moves the previous row into a new, deeper run (what it
    saves there, the longer prefix, beats what it saved in the old run). Only pages wholly
    before a row's newest token are shared (the newest token's page is the row's own)."""
    limit = [(c - 1) // block_size for c in ctx_lens]
    order = sorted(
        (i for i in range(len(tables)) if limit[i] >= min_pages), key=lambda i: (tables[i], ctx_lens[i])
    )
    # Rows with the very same table are positions of one sequence (a speculative draft verified
    # as one row per token: two sequences never share the page their newest token is written to).
    # Only its first row may join a group, so each draft row attends exactly as that position
    # would alone: with the same rounding as without speculation.
    order = [r for k, r in enumerate(order) if k == 0 or tables[order[k - 1]] != tables[r]]
    groups: list[PrefixGroup] = []
    run: list[int] = []
    shared = 0
    for prev, row in zip(order, order[1:]):
        cap = min(limit[prev], limit[row])
        a, b = tables[prev], tables[row]
        # Forked rows share their whole prefix: one C-level slice compare, else the first miss.
        lcp = cap if a[:cap] == b[:cap] else next(i for i in range(cap) if a[i] != b[i])
        if lcp < min_pages:
            if len(run) > 1:
                groups.append(PrefixGroup(run, shared))
            run, shared = [], 0
        elif not run:
            run, shared = [prev, row], lcp
        elif lcp == shared:
            run.append(row)
        elif lcp > shared:
            if len(run) > 2:
                groups.append(PrefixGroup(run[:-1], shared))
            run, shared = [prev, row], lcp
        else:
            groups.append(PrefixGroup(run, shared))
            run, shared = [], 0
    if len(run) > 1:
        groups.append(PrefixGroup(run, shared))
    return groups


def pack_groups(
    groups: list[PrefixGroup], tables: Sequence[list[int]], block_size: int, num_rows: int
) -> SharedPrefixGroups:
    """The groups as padded tensors (one tensor per field, built from padded lists: a
    torch.tensor call per group costs more than the whole grouping)."""
    bs = block_size
    max_pages = max(g.num_pages for g in groups)
    max_members = max(len(g.rows) for g in groups)
    pages = torch.tensor(
        [tables[g.rows[0]][: g.num_pages] + [PAD_PAGE] * (max_pages - g.num_pages) for g in groups],
        dtype=torch.long,
    )
    lens = torch.tensor([g.num_pages * bs for g in groups], dtype=torch.long)
    key_mask = (torch.arange(max_pages * bs)[None, :] >= lens[:, None]).unsqueeze(1)
    rows_t = torch.tensor(
        [g.rows + [num_rows] * (max_members - len(g.rows)) for g in groups], dtype=torch.long
    )
    member_index = [gi * max_members + j for gi, g in enumerate(groups) for j in range(len(g.rows))]
    member_rows = [r for g in groups for r in g.rows]
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g.rows))
    return SharedPrefixGroups(
        pages,
        key_mask,
        rows_t,
        torch.tensor(member_index, dtype=torch.long),
        torch.tensor(member_rows, dtype=torch.long),
        lens,
        torch.tensor(offsets, dtype=torch.long),
        all_rows=len(member_rows) == num_rows,
    )
