"""PrefixCache: a radix tree over page-sized token runs, shared by all requests.

Each node is one full page of KV: its key is the page's `block_size` token ids and its path from
the root is the token prefix that produced it, so a page is reusable exactly when a new sequence
starts with the same tokens. The tree holds no reference counts of its own: a page in use has
pool refcount > 0; a cached page nobody uses (refcount 0) stays resident and counts as free
capacity until the pool needs it, when idle pages are evicted leaf-first, least recently used
first. A used page's ancestors are always used too (a sequence holds its whole prefix), so every
idle page can eventually be evicted leaf-first.

With `eviction="lfu"` the idle leaves that were reused least go first (then the least recently
used among them), as SGLang's `--radix-eviction-policy lfu`: a page computed once for one request's
own question or output leaves before a system prompt's page that many requests matched, even when
the system prompt was matched longer ago. That is the working set of a replica that prefix routing
sends a share of the system prompts to.
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
    hits: int = 0  # times a sequence found this page cached (matched, or computed it again)


EVICTION_POLICIES = ("lru", "lfu")


class PrefixCache:
    def __init__(self, block_size: int, eviction: str = "lru") -> None:
        if eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"prefix_cache_eviction must be one of {list(EVICTION_POLICIES)}, got {eviction!r}"
            )
        self.block_size = block_size
        self.lfu = eviction == "lfu"
        self.root = CacheNode(-1, (), None)
        self._by_block: dict[int, CacheNode] = {}
        self._idle: set[int] = set()  # cached pages with refcount 0
        # (hits under lfu else 0, last_access, tiebreak, block) of idle leaves
        self._heap: list[tuple[int, int, int, int]] = []
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
            child.hits += 1
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
            existing.hits += 1
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
        """Drop up to n idle pages, leaves first, least recently used first (lfu: least reused
        first, then least recently used); returns their ids."""
        freed: list[int] = []
        while len(freed) < n and self._heap:
            hits, stamp, _, block = heapq.heappop(self._heap)
            node = self._by_block.get(block)
            if node is None or block not in self._idle or node.children:
                continue  # stale entry: evicted, in use again, or no longer a leaf
            if node.last_access != stamp or self._hits(node) != hits:  # touched since queued: requeue
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

    def _hits(self, node: CacheNode) -> int:
        return node.hits if self.lfu else 0

    def _push(self, node: CacheNode) -> None:
        heapq.heappush(self._heap, (self._hits(node), node.last_access, next(self._tiebreak), node.block_id))

    def _remove(self, node: CacheNode) -> None:
        assert node.parent is not None
        del node.parent.children[node.key]
        del self._by_block[node.block_id]
        self._idle.discard(node.block_id)
