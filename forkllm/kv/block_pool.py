"""BlockPool: fixed-size KV pages with reference counts.

A page is an index into the runner's KV tensors; the pool only does the bookkeeping. Forked
sequences share pages, so a page is released when its last holder lets go: back to the free list,
or, if the prefix cache holds it, into the cache's idle set, where it stays reusable until an
allocation needs the room and the cache evicts it. Page 0 is reserved as a padding page that
padded block tables point at.

The KV tensors are allocated with torch.empty (zeroing gigabytes at start-up costs seconds), so a
page handed out for the first time may hold garbage; masked attention weights are exact zeros but
0 * NaN is NaN, so such pages are queued for zeroing and the runner clears them before use.
"""

from __future__ import annotations

from collections import deque

from forkllm.kv.prefix_cache import PrefixCache

NULL_BLOCK = 0


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, cache: PrefixCache | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.ref_counts[NULL_BLOCK] = 1  # never freed
        self._free: deque[int] = deque(range(1, num_blocks))
        self._used_before = bytearray(num_blocks)
        self._used_before[NULL_BLOCK] = 1
        self._pending_zero: list[int] = []
        self.cache = cache

    @property
    def num_free(self) -> int:
        """Pages an allocation can get: free ones plus idle cached ones (evicted on demand)."""
        return len(self._free) + (self.cache.num_idle if self.cache else 0)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        """Pages some sequence holds."""
        return self.num_usable - self.num_free

    @property
    def num_cached_idle(self) -> int:
        return self.cache.num_idle if self.cache else 0

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocksError(f"asked for {n} KV pages, {self.num_free} free")
        if n > len(self._free):
            assert self.cache is not None
            self._free.extend(self.cache.evict(n - len(self._free)))
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
            if not self._used_before[b]:
                self._used_before[b] = 1
                self._pending_zero.append(b)
        return blocks

    def incref(self, blocks: list[int]) -> None:
        """Take another reference (a fork, or a prefix-cache hit reviving an idle cached page)."""
        cache = self.cache
        for b in blocks:
            if self.ref_counts[b] == 0:
                assert cache is not None and cache.contains(b), f"incref of free page {b}"
                cache.on_busy(b)
            self.ref_counts[b] += 1

    def decref(self, blocks: list[int]) -> None:
        cache = self.cache
        for b in blocks:
            rc = self.ref_counts[b] - 1
            assert rc >= 0, f"double free of page {b}"
            self.ref_counts[b] = rc
            if rc == 0:
                if cache is not None and cache.contains(b):
                    cache.on_idle(b)
                else:
                    self._free.append(b)

    def drop_cached(self) -> None:
        """Evict every idle cached page (benchmarks: start a run cold)."""
        if self.cache is not None:
            self._free.extend(self.cache.evict_all_idle())

    def take_pending_zero(self) -> list[int]:
        """Pages handed out for the first time since the last call; the runner zeroes them."""
        pending, self._pending_zero = self._pending_zero, []
        return pending
