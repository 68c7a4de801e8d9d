"""BlockPool: exact block ids, ref counts, LRU eviction of cached free blocks, and usage."""

import pytest

from tokenforge.engine.block_pool import BlockPool


def make_hash(i: int) -> bytes:
    return f"hash-{i}".encode()


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_new_pool_has_every_block_free():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.usage == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)


def test_get_new_blocks_hands_out_the_front_of_the_free_queue():
    pool = BlockPool(5)
    first = pool.get_new_blocks(2)
    second = pool.get_new_blocks(1)
    assert ids(first) == [0, 1]
    assert ids(second) == [2]
    assert [b.ref_cnt for b in first + second] == [1, 1, 1]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(3 / 5)


def test_get_new_blocks_refuses_more_than_free_without_taking_any():
    pool = BlockPool(3)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="asked for 2 blocks, 1 free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1
    assert ids(pool.get_new_blocks(1)) == [2]


def test_get_zero_blocks_is_a_no_op():
    pool = BlockPool(2)
    assert pool.get_new_blocks(0) == []
    assert pool.num_free_blocks == 2


def test_freed_blocks_join_the_back_of_the_free_queue_in_the_order_given():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)  # 0, 1, 2; block 3 stays free
    pool.free_blocks([blocks[2], blocks[0]])
    assert [b.ref_cnt for b in blocks] == [0, 1, 0]
    # Least recently freed first: the never-used block 3, then 2, then 0.
    assert ids(pool.get_new_blocks(3)) == [3, 2, 0]


def test_tail_first_free_evicts_a_requests_tail_before_its_head():
    pool = BlockPool(3)
    request_blocks = pool.get_new_blocks(3)
    for i, block in enumerate(request_blocks):
        pool.cache_block(block, make_hash(i))
    pool.free_blocks(list(reversed(request_blocks)))  # what KVCacheManager.free does

    (reused,) = pool.get_new_blocks(1)
    assert reused.block_id == 2
    assert pool.get_cached_block(make_hash(2)) is None
    assert pool.get_cached_block(make_hash(0)) is request_blocks[0]
    assert pool.get_cached_block(make_hash(1)) is request_blocks[1]
    assert ids(pool.get_new_blocks(2)) == [1, 0]


def test_touch_takes_a_reference_and_pulls_free_blocks_out_of_the_queue():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, make_hash(0))
    pool.free_blocks([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 3

    pool.touch([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 2
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    assert pool.num_free_blocks == 2
    # The touched block is not handed out again while held.
    assert ids(pool.get_new_blocks(2)) == [1, 2]


def test_shared_block_becomes_free_only_when_the_last_reference_drops():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 1
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert pool.num_free_blocks == 2


def test_touch_then_free_moves_a_cached_block_to_the_back_of_the_lru():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, make_hash(i))
    pool.free_blocks(blocks)  # queue: 0, 1, 2
    pool.touch([blocks[0]])  # a prefix hit on block 0
    pool.free_blocks([blocks[0]])  # queue: 1, 2, 0
    assert ids(pool.get_new_blocks(1)) == [1]
    assert pool.get_cached_block(make_hash(1)) is None
    assert pool.get_cached_block(make_hash(0)) is blocks[0]


def test_double_free_asserts():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(AssertionError, match="block 0 freed twice"):
        pool.free_blocks([block])


def test_free_of_a_never_allocated_block_asserts():
    pool = BlockPool(2)
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free_blocks([pool.blocks[1]])


def test_cached_block_is_found_by_hash_and_stays_cached_while_free():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, make_hash(7))
    assert block.block_hash == make_hash(7)
    assert pool.get_cached_block(make_hash(7)) is block
    pool.free_blocks([block])
    assert pool.get_cached_block(make_hash(7)) is block
    assert pool.get_cached_block(make_hash(8)) is None


def test_reusing_a_cached_free_block_evicts_its_hash():
    pool = BlockPool(1)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, make_hash(0))
    pool.free_blocks([block])

    (reused,) = pool.get_new_blocks(1)
    assert reused is block
    assert reused.ref_cnt == 1
    assert reused.block_hash is None
    assert pool.get_cached_block(make_hash(0)) is None
    # The block can be cached again under new content.
    pool.cache_block(reused, make_hash(1))
    assert pool.get_cached_block(make_hash(1)) is reused


def test_eviction_takes_uncached_free_blocks_before_recently_freed_cached_ones():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)  # 0, 1; queue: 2, 3
    for i, block in enumerate(blocks):
        pool.cache_block(block, make_hash(i))
    pool.free_blocks(list(reversed(blocks)))  # queue: 2, 3, 1, 0
    assert ids(pool.get_new_blocks(2)) == [2, 3]
    assert pool.get_cached_block(make_hash(0)) is blocks[0]
    assert pool.get_cached_block(make_hash(1)) is blocks[1]
    assert ids(pool.get_new_blocks(1)) == [1]
    assert pool.get_cached_block(make_hash(1)) is None
    assert pool.get_cached_block(make_hash(0)) is blocks[0]


def test_cache_block_first_writer_wins():
    pool = BlockPool(2)
    first, second = pool.get_new_blocks(2)
    pool.cache_block(first, make_hash(0))
    pool.cache_block(second, make_hash(0))  # same content computed twice
    assert pool.get_cached_block(make_hash(0)) is first
    assert second.block_hash is None
    # Reusing the uncached duplicate leaves the first copy's entry alone.
    pool.free_blocks([second])
    pool.get_new_blocks(1)
    assert pool.get_cached_block(make_hash(0)) is first


def test_cache_block_keeps_a_blocks_first_hash():
    pool = BlockPool(1)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, make_hash(0))
    pool.cache_block(block, make_hash(1))
    assert block.block_hash == make_hash(0)
    assert pool.get_cached_block(make_hash(1)) is None


def test_cache_block_is_a_no_op_without_caching():
    pool = BlockPool(1, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, make_hash(0))
    assert block.block_hash is None
    assert pool.get_cached_block(make_hash(0)) is None


def test_reset_prefix_cache_drops_every_hash():
    pool = BlockPool(2)
    held, freed = pool.get_new_blocks(2)
    pool.cache_block(held, make_hash(0))
    pool.cache_block(freed, make_hash(1))
    pool.free_blocks([freed])
    assert pool.reset_prefix_cache() is False  # a block is still held: nothing changes
    assert pool.get_cached_block(make_hash(0)) is held and held.block_hash == make_hash(0)
    pool.free_blocks([held])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(make_hash(0)) is None
    assert pool.get_cached_block(make_hash(1)) is None
    assert held.block_hash is None and freed.block_hash is None
    assert pool.num_free_blocks == 2


def test_usage_counts_cached_free_blocks_as_free():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    assert pool.usage == 1.0
    pool.cache_block(blocks[0], make_hash(0))
    pool.free_blocks(blocks[:2])
    assert pool.usage == pytest.approx(0.5)
    pool.touch([blocks[0]])
    assert pool.usage == pytest.approx(0.75)
    pool.free_blocks([blocks[0]] + blocks[2:])
    assert pool.usage == 0.0
