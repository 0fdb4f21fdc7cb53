"""KVCacheManager: grows and releases per-sequence block tables on top of the BlockPool."""

from __future__ import annotations

from dataclasses import dataclass

from forkllm.kv.block_pool import BlockPool


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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` to hold `num_tokens` tokens. False (and no change) if pages are short."""
        need = self.num_new_blocks(block_table, num_tokens)
        if need == 0:
            return True
        if need > self.pool.num_free:
            return False
        block_table.extend(self.pool.allocate(need))
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop this holder's reference to every page; pages nobody else holds become free."""
        if block_table:
            self.pool.decref(block_table)
            block_table.clear()

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable
