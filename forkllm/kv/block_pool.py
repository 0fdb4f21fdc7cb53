"""BlockPool: fixed-size KV pages with reference counts.

A page is an index into the runner's KV tensors; the pool only does the bookkeeping. Reference
counts exist from the start because forked sequences share pages: a page returns to the free list
when its last holder lets go. Page 0 is reserved as an all-zero padding page that padded block
tables point at.

The KV tensors are allocated with torch.empty (zeroing gigabytes at start-up costs seconds), so a
page handed out for the first time may hold garbage; masked attention weights are exact zeros but
0 * NaN is NaN, so such pages are queued for zeroing and the runner clears them before use.
"""

from __future__ import annotations

from collections import deque

NULL_BLOCK = 0


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.ref_counts[NULL_BLOCK] = 1  # never freed
        self._free: deque[int] = deque(range(1, num_blocks))
        self._used_before = bytearray(num_blocks)
        self._used_before[NULL_BLOCK] = 1
        self._pending_zero: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV pages, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
            if not self._used_before[b]:
                self._used_before[b] = 1
                self._pending_zero.append(b)
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"incref of free page {b}"
            self.ref_counts[b] += 1

    def decref(self, blocks: list[int]) -> None:
        for b in blocks:
            rc = self.ref_counts[b] - 1
            assert rc >= 0, f"double free of page {b}"
            self.ref_counts[b] = rc
            if rc == 0:
                self._free.append(b)

    def take_pending_zero(self) -> list[int]:
        """Pages handed out for the first time since the last call; the runner zeroes them."""
        pending, self._pending_zero = self._pending_zero, []
        return pending
