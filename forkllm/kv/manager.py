"""KVCacheManager: block tables on top of the BlockPool and the PrefixCache.

It grows tables, copies a shared partially filled page before a sequence writes into it
(copy-on-write: forked children share every page, including the last, until they diverge),
revives cached pages for a new sequence's prefix, and registers pages in the prefix cache as
they fill.
"""

from __future__ import annotations

from dataclasses import dataclass

from forkllm.kv.block_pool import BlockPool
from forkllm.kv.prefix_cache import CacheNode, PrefixCache


@dataclass(frozen=True)
class KVCacheSpec:
    """How big the pool is and what it holds (reported at start-up)."""

    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


@dataclass(frozen=True)
class PageCopy:
    """Copy-on-write: the runner copies page `src` into page `dst` (all layers) before the step."""

    src: int
    dst: int


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, eviction: str = "lru"
    ) -> None:
        self.block_size = block_size
        self.cache = PrefixCache(block_size, eviction) if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, self.cache)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ---------------------------------------------------------------------------
    def allocate(
        self,
        block_table: list[int],
        num_tokens: int,
        first_write: int | None = None,
        copies: list[PageCopy] | None = None,
    ) -> bool:
        """Grow `block_table` to hold `num_tokens` tokens and make the page that receives position
        `first_write` private (copy-on-write if shared). False, and no change, if pages are short."""
        bs, pool = self.block_size, self.pool
        need = max(0, self.blocks_for(num_tokens) - len(block_table))
        cow = None
        if first_write is not None and first_write < num_tokens:
            idx = first_write // bs
            if idx < len(block_table) and pool.ref_counts[block_table[idx]] > 1:
                cow = idx
        if need + (cow is not None) > pool.num_free:
            return False
        if cow is not None:
            old = block_table[cow]
            new = pool.allocate(1)[0]
            pool.decref([old])  # still held by the other sharers
            block_table[cow] = new
            assert copies is not None, "a shared page needs a copy list"
            copies.append(PageCopy(old, new))
        if need:
            block_table.extend(pool.allocate(need))
        return True

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Release the pages past those holding `num_tokens` tokens (speculative drafts that were
        rejected leave such pages behind)."""
        keep = self.blocks_for(num_tokens)
        if len(block_table) > keep:
            self.pool.decref(block_table[keep:])
            del block_table[keep:]

    def free(self, block_table: list[int], nodes: list[CacheNode] | None = None) -> None:
        """Drop this holder's reference to every page; pages nobody else holds become free/idle."""
        if block_table:
            self.pool.decref(block_table)
            block_table.clear()
        if nodes:
            nodes.clear()

    def share(self, block_table: list[int]) -> list[int]:
        """A fork's copy of `block_table`: same pages, one more reference each."""
        self.pool.incref(block_table)
        return list(block_table)

    # ---- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> list[CacheNode]:
        if self.cache is None:
            return []
        return self.cache.match(token_ids, len(token_ids) // self.block_size)

    def acquire_prefix(self, block_table: list[int], nodes: list[CacheNode]) -> None:
        ids = [n.block_id for n in nodes]
        self.pool.incref(ids)
        block_table.extend(ids)

    def register_full_pages(
        self, token_ids: list[int], block_table: list[int], nodes: list[CacheNode], num_computed: int
    ) -> None:
        """Insert the sequence's newly filled pages into the prefix cache. When an identical page
        is already cached, switch to it and release the duplicate."""
        if self.cache is None:
            return
        bs = self.block_size
        for i in range(len(nodes), num_computed // bs):
            node = self.cache.insert(
                nodes[-1] if nodes else None, tuple(token_ids[i * bs : (i + 1) * bs]), block_table[i]
            )
            if node.block_id != block_table[i]:
                self.pool.incref([node.block_id])
                self.pool.decref([block_table[i]])
                block_table[i] = node.block_id
            nodes.append(node)

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable
