import pytest

from forkllm.kv.block_pool import NULL_BLOCK, BlockPool, NoFreeBlocksError
from forkllm.kv.manager import KVCacheManager


def test_pool_allocate_free_refcounts():
    pool = BlockPool(8)
    assert pool.num_free == 7  # page 0 is the reserved padding page
    a = pool.allocate(3)
    assert NULL_BLOCK not in a and len(set(a)) == 3
    assert pool.num_free == 4
    pool.incref(a[:1])
    pool.decref(a)
    assert pool.num_free == 6  # a[0] still held by its second owner
    pool.decref(a[:1])
    assert pool.num_free == 7
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(8)


def test_pool_zeroes_each_page_once():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert sorted(pool.take_pending_zero()) == sorted(a)
    pool.decref(a)
    b = pool.allocate(3)
    assert pool.take_pending_zero() == []  # reused pages hold finite old values
    assert sorted(b) == sorted(a)


def test_pool_double_free_is_caught():
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool.decref(a)
    with pytest.raises(AssertionError):
        pool.decref(a)


def test_manager_grows_tables_by_pages():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    table: list[int] = []
    assert kv.allocate(table, 1) and len(table) == 1
    assert kv.allocate(table, 4) and len(table) == 1
    assert kv.allocate(table, 5) and len(table) == 2
    assert not kv.allocate(table, 4 * 6)  # more than the pool: nothing changes
    assert len(table) == 2
    kv.free(table)
    assert table == [] and kv.pool.num_free == 5
