"""PrefixCache: a radix tree over page-sized token runs, shared by all requests.

Each node is one full page of KV: its key is the page's `block_size` token ids and its path from
the root is the token prefix that produced it, so a page is reusable exactly when a new sequence
starts with the same tokens. The tree holds no reference counts of its own: a page in use has
pool refcount > 0; a cached page nobody uses (refcount 0) stays resident and counts as free
capacity until the pool needs it, when idle pages are evicted leaf-first, least recently used
first. A used page's ancestors are always used too (a sequence holds its whole prefix), so every
idle page can eventually be evicted leaf-first.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class CacheNode:
    block_id: int
    key: tuple[int, ...]
    parent: CacheNode | None
    children: dict[tuple[int, ...], CacheNode] = field(default_factory=dict)
    last_access: int = 0


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = CacheNode(-1, (), None)
        self._by_block: dict[int, CacheNode] = {}
        self._idle: set[int] = set()  # cached pages with refcount 0
        self._heap: list[tuple[int, int, int]] = []  # (last_access, tiebreak, block) of idle leaves
        self._tiebreak = itertools.count()
        self._clock = 0

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_cached(self) -> int:
        return len(self._by_block)

    @property
    def num_idle(self) -> int:
        """Cached pages no sequence holds: reclaimable capacity."""
        return len(self._idle)

    def contains(self, block_id: int) -> bool:
        return block_id in self._by_block

    def match(self, token_ids: list[int], max_pages: int) -> list[CacheNode]:
        """The cached pages that start `token_ids`, longest run first to last, at most max_pages."""
        self._clock += 1
        bs, node, out = self.block_size, self.root, []
        for i in range(min(max_pages, len(token_ids) // bs)):
            child = node.children.get(tuple(token_ids[i * bs : (i + 1) * bs]))
            if child is None:
                break
            child.last_access = self._clock
            out.append(child)
            node = child
        return out

    # ---- updates (called by the pool / manager) -----------------------------------------------
    def insert(self, parent: CacheNode | None, key: tuple[int, ...], block_id: int) -> CacheNode:
        """Register a full page under `parent` (None = root). If an identical page is already
        cached there, that node is returned and the caller should switch to its page."""
        parent = parent or self.root
        existing = parent.children.get(key)
        if existing is not None:
            existing.last_access = self._clock
            return existing
        node = CacheNode(block_id, key, parent, last_access=self._clock)
        parent.children[key] = node
        self._by_block[block_id] = node
        return node

    def on_idle(self, block_id: int) -> None:
        """A cached page's refcount fell to 0."""
        node = self._by_block[block_id]
        self._idle.add(block_id)
        if not node.children:
            self._push(node)

    def on_busy(self, block_id: int) -> None:
        """A cached page's refcount rose from 0 (its heap entry goes stale)."""
        self._idle.discard(block_id)

    def evict(self, n: int) -> list[int]:
        """Drop up to n idle pages, leaves first, least recently used first; returns their ids."""
        freed: list[int] = []
        while len(freed) < n and self._heap:
            stamp, _, block = heapq.heappop(self._heap)
            node = self._by_block.get(block)
            if node is None or block not in self._idle or node.children:
                continue  # stale entry: evicted, in use again, or no longer a leaf
            if node.last_access != stamp:  # touched since it was queued: requeue at its new age
                self._push(node)
                continue
            self._remove(node)
            freed.append(block)
            parent = node.parent
            if (
                parent is not None
                and parent is not self.root
                and not parent.children
                and parent.block_id in self._idle
            ):
                self._push(parent)
        return freed

    def evict_all_idle(self) -> list[int]:
        return self.evict(len(self._idle))

    def _push(self, node: CacheNode) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node.block_id))

    def _remove(self, node: CacheNode) -> None:
        assert node.parent is not None
        del node.parent.children[node.key]
        del self._by_block[node.block_id]
        self._idle.discard(node.block_id)
