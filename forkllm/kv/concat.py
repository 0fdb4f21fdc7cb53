"""Joining sibling threads by page reference (Multiverse's join, without its token-sized pages).

k children forked from a parent at `base` slots each wrote their own tokens after it. The join
makes one page table: the parent's pages before `base`, then each child's pages from the page
holding slot `base` on. Nothing is copied or recomputed; the child's pages move to the joined
table with their references. Pages are `block_size` slots, so the seams leave slots that hold no
token of the joined context, recorded as holes (never attended to):
- a child after the first starts inside the page it copied from the parent's partial last page:
  its first `base % block_size` slots repeat the parent's tail (the first child's copy serves);
- every child but the last ends inside its last page: the rest of that page.
Each child's tokens keep the positions they were written at (children overlap in position, as in
Multiverse); the joined sequence continues at the largest next position of any child.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class JoinBranch:
    """One side of a join as the kv layer sees it: a table, its computed slots, its holes and the
    RoPE position its next slot would take."""

    block_table: list[int]
    num_slots: int
    holes: list[tuple[int, int]]
    next_position: int


@dataclass
class PageJoin:
    """The joined table and what it means: `regions[i]` = (joined slot where child i's own tokens
    start, their count); `released` = page references the join drops (the children's references
    to the parent's pages, the parent's own partial last page, pages past what a child computed)."""

    block_table: list[int]
    num_slots: int
    holes: list[tuple[int, int]]
    position_shift: int
    regions: list[tuple[int, int]] = field(default_factory=list)
    released: list[int] = field(default_factory=list)


def join_pages(parent: JoinBranch, children: list[JoinBranch], block_size: int) -> PageJoin:
    """The page-level join of `children` (each forked from `parent` at `parent.num_slots`)."""
    bs, base = block_size, parent.num_slots
    first_page, tail = divmod(base, bs)
    table = list(parent.block_table[:first_page])
    released: list[int] = []  # the children's references; the parent's tail page is added below
    holes = [h for h in parent.holes if h[0] < base]
    regions: list[tuple[int, int]] = []
    end = base
    next_position = parent.next_position
    for child in children:
        if child.num_slots < base or child.block_table[:first_page] != table[:first_page]:
            raise ValueError("a joined thread must extend its parent's pages")
        used = -(-child.num_slots // bs)
        released.extend(child.block_table[:first_page])
        released.extend(child.block_table[used:])
        n = child.num_slots - base
        if n == 0:  # wrote nothing of its own: drops every reference
            released.extend(child.block_table[first_page:used])
            regions.append((end, 0))
            continue
        start_page = len(table)
        delta = (start_page - first_page) * bs  # child slot j sits at joined slot j + delta
        if regions and end < start_page * bs:  # the previous child's last page, past its tokens
            holes.append((end, start_page * bs))
        if delta and tail:  # this child's copy of the parent's tail: a repeat
            holes.append((start_page * bs, start_page * bs + tail))
        holes.extend((a + delta, b + delta) for a, b in child.holes if a >= base)
        table.extend(child.block_table[first_page:used])
        regions.append((base + delta, n))
        end = child.num_slots + delta
        next_position = max(next_position, child.next_position)
    if end == base:  # no child wrote anything: the parent as it was
        shift = base - parent.next_position
        return PageJoin(list(parent.block_table), base, list(parent.holes), shift, regions, released)
    released.extend(parent.block_table[first_page:])  # its partial page: the first child's copy serves
    return PageJoin(table, end, _merge(holes), end - next_position, regions, released)


def _merge(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(h for h in holes if h[1] > h[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
