"""KVCacheManager: slot allocation with exact block ids, and the prefix cache over chained hashes."""

from tokenforge.engine.kv_cache_manager import hash_block
from tokenforge.engine.request import Request

from .conftest import BLOCK_SIZE, make_kv_cache_manager, make_request


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def compute(kv, request: Request, num_tokens: int | None = None) -> None:
    """Allocates and 'computes' the request's remaining tokens, then caches its full blocks."""
    num_tokens = request.num_tokens - request.num_computed_tokens if num_tokens is None else num_tokens
    assert kv.allocate_slots(request, num_tokens) is not None
    request.num_computed_tokens += num_tokens
    kv.cache_blocks(request)


def admit(kv, request: Request):
    """What the scheduler does on admission: prefix hits, then slots for the rest of the prompt."""
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    new_blocks = kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits)
    if new_blocks is not None:
        request.num_computed_tokens = num_hit_tokens
    return hits, num_hit_tokens, new_blocks


# --- allocate_slots ---------------------------------------------------------------------------


def test_allocate_slots_takes_ceil_of_tokens_over_block_size():
    kv = make_kv_cache_manager(num_blocks=8)
    request = make_request("a", num_prompt_tokens=10)
    new_blocks = kv.allocate_slots(request, 10)
    assert ids(new_blocks) == [0, 1, 2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert [b.ref_cnt for b in new_blocks] == [1, 1, 1]
    assert kv.num_free_blocks == 5


def test_allocate_slots_for_an_exact_multiple_of_the_block_size():
    kv = make_kv_cache_manager(num_blocks=8)
    request = make_request("a", num_prompt_tokens=2 * BLOCK_SIZE)
    assert ids(kv.allocate_slots(request, 2 * BLOCK_SIZE)) == [0, 1]


def test_decode_takes_a_new_block_only_when_the_last_one_is_full():
    kv = make_kv_cache_manager(num_blocks=8)
    a = make_request("a", num_prompt_tokens=4)
    b = make_request("b", num_prompt_tokens=3)
    compute(kv, a)
    compute(kv, b)
    assert kv.get_block_ids("a") == [0]
    assert kv.get_block_ids("b") == [1]

    a.output_token_ids.append(7)  # token 5 of a: a new block
    b.output_token_ids.append(7)  # token 4 of b: still fits in block 1
    assert ids(kv.allocate_slots(a, 1)) == [2]
    assert kv.allocate_slots(b, 1) == []
    a.num_computed_tokens += 1
    b.num_computed_tokens += 1

    b.output_token_ids.append(7)  # token 5 of b: a new block
    assert ids(kv.allocate_slots(b, 1)) == [3]
    assert kv.get_block_ids("a") == [0, 2]
    assert kv.get_block_ids("b") == [1, 3]


def test_chunked_prefill_allocates_per_chunk():
    kv = make_kv_cache_manager(num_blocks=8)
    request = make_request("a", num_prompt_tokens=10)
    assert ids(kv.allocate_slots(request, 3)) == [0]
    request.num_computed_tokens = 3
    assert ids(kv.allocate_slots(request, 3)) == [1]  # tokens 3..5
    request.num_computed_tokens = 6
    assert ids(kv.allocate_slots(request, 4)) == [2]  # tokens 6..9
    assert kv.get_block_ids("a") == [0, 1, 2]


def test_allocate_slots_returns_none_and_changes_nothing_for_a_new_request():
    kv = make_kv_cache_manager(num_blocks=2)
    a = make_request("a", num_prompt_tokens=8)
    b = make_request("b", num_prompt_tokens=1)
    kv.allocate_slots(a, 8)
    assert kv.allocate_slots(b, 1) is None
    assert "b" not in kv.req_to_blocks
    assert kv.get_block_ids("b") == []
    assert kv.get_block_ids("a") == [0, 1]
    assert kv.num_free_blocks == 0


def test_allocate_slots_returns_none_and_keeps_a_running_requests_blocks():
    kv = make_kv_cache_manager(num_blocks=3)
    a = make_request("a", num_prompt_tokens=12)
    assert ids(kv.allocate_slots(a, 8)) == [0, 1]
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 4) == [kv.block_pool.blocks[2]]
    a.num_computed_tokens = 12
    a.output_token_ids.append(7)
    assert kv.allocate_slots(a, 1) is None
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert [b.ref_cnt for b in kv.block_pool.blocks] == [1, 1, 1]


def test_free_releases_blocks_tail_first():
    kv = make_kv_cache_manager(num_blocks=3)
    a = make_request("a", num_prompt_tokens=12)
    compute(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 3
    assert kv.get_block_ids("a") == []
    # The tail (block 2) is evicted first; the head stays cached longest.
    b = make_request("b", prompt=[1, 2, 3, 4])
    compute(kv, b)
    assert kv.get_block_ids("b") == [2]
    c = make_request("c", prompt=a.prompt_token_ids + [5])
    hits, num_hit_tokens, _ = admit(kv, c)
    assert ids(hits) == [0, 1]
    assert num_hit_tokens == 8


# --- prefix cache -----------------------------------------------------------------------------


def test_shared_prefix_hits_the_same_blocks_across_two_requests():
    kv = make_kv_cache_manager(num_blocks=8)
    shared = list(range(100, 108))  # two full blocks
    a = make_request("a", prompt=shared + [1, 2])
    compute(kv, a)
    assert kv.get_block_ids("a") == [0, 1, 2]

    b = make_request("b", prompt=shared + [3, 4, 5])
    hits, num_hit_tokens, new_blocks = admit(kv, b)
    assert ids(hits) == [0, 1]
    assert num_hit_tokens == 8
    assert ids(new_blocks) == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [kv.block_pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert kv.num_free_blocks == 4


def test_freeing_one_sharer_keeps_shared_blocks_held():
    kv = make_kv_cache_manager(num_blocks=8)
    shared = list(range(100, 108))
    a = make_request("a", prompt=shared + [1])
    compute(kv, a)
    b = make_request("b", prompt=shared + [2])
    admit(kv, b)
    kv.free(a)
    assert [kv.block_pool.blocks[i].ref_cnt for i in range(4)] == [1, 1, 0, 1]
    assert kv.num_free_blocks == 5


def test_last_token_is_never_served_from_the_cache():
    kv = make_kv_cache_manager(num_blocks=8)
    prompt = list(range(100, 108))  # exactly two full blocks
    a = make_request("a", prompt=prompt)
    compute(kv, a)
    assert all(kv.block_pool.blocks[i].block_hash is not None for i in (0, 1))

    b = make_request("b", prompt=prompt)
    hits, num_hit_tokens, new_blocks = admit(kv, b)
    assert ids(hits) == [0]
    assert num_hit_tokens == 4
    assert ids(new_blocks) == [2]  # block 1's tokens are recomputed into a fresh block
    assert kv.get_block_ids("b") == [0, 2]


def test_one_token_past_the_cached_blocks_hits_them_all():
    kv = make_kv_cache_manager(num_blocks=8)
    prompt = list(range(100, 108))
    compute(kv, make_request("a", prompt=prompt))
    hits, num_hit_tokens, new_blocks = admit(kv, make_request("b", prompt=prompt + [1]))
    assert ids(hits) == [0, 1]
    assert num_hit_tokens == 8
    assert ids(new_blocks) == [2]


def test_prompt_shorter_than_a_block_gets_no_hits():
    kv = make_kv_cache_manager(num_blocks=8)
    compute(kv, make_request("a", prompt=[1, 2, 3, 4]))
    hits, num_hit_tokens = kv.get_computed_blocks(make_request("b", prompt=[1, 2, 3]))
    assert hits == [] and num_hit_tokens == 0


def test_duplicate_content_keeps_the_first_cached_copy():
    kv = make_kv_cache_manager(num_blocks=8)
    prompt = list(range(100, 108))
    compute(kv, make_request("a", prompt=prompt))
    b = make_request("b", prompt=prompt)
    admit(kv, b)
    b.num_computed_tokens = 8
    kv.cache_blocks(b)
    # b's block 2 holds the same tokens as a's block 1; the cache keeps a's.
    assert kv.block_pool.blocks[2].block_hash is None
    block_1_hash = kv.block_pool.blocks[1].block_hash
    assert kv.block_pool.get_cached_block(block_1_hash) is kv.block_pool.blocks[1]


def test_hits_in_the_free_queue_count_against_free_blocks():
    kv = make_kv_cache_manager(num_blocks=3)
    shared = list(range(100, 108))
    a = make_request("a", prompt=shared)
    compute(kv, a)
    kv.free(a)  # blocks 0 and 1 are free but cached; queue: 2, 1, 0
    assert kv.num_free_blocks == 3

    # 16 tokens: two hits (both free) and two new blocks, but only one block is free besides the hits.
    b = make_request("b", prompt=shared + list(range(200, 208)))
    hits, num_hit_tokens, new_blocks = admit(kv, b)
    assert ids(hits) == [0, 1]
    assert new_blocks is None
    assert "b" not in kv.req_to_blocks
    assert [blk.ref_cnt for blk in kv.block_pool.blocks] == [0, 0, 0]
    assert kv.num_free_blocks == 3
    assert kv.get_computed_blocks(make_request("probe", prompt=shared + [1]))[1] == 8

    # 12 tokens: two hits and exactly the one other free block.
    c = make_request("c", prompt=shared + [1, 2, 3, 4])
    hits, num_hit_tokens, new_blocks = admit(kv, c)
    assert ids(hits) == [0, 1]
    assert ids(new_blocks) == [2]
    assert kv.get_block_ids("c") == [0, 1, 2]
    assert [blk.ref_cnt for blk in kv.block_pool.blocks] == [1, 1, 1]
    assert kv.num_free_blocks == 0


def test_hashes_are_chained_so_equal_blocks_after_different_prefixes_do_not_hit():
    kv = make_kv_cache_manager(num_blocks=8)
    x, y, w, v = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    compute(kv, make_request("a", prompt=x + y + [9]))  # caches x, then y after x
    compute(kv, make_request("c", prompt=w + v + [9]))  # caches w, then v after w

    # w hits; y follows w here, not x, so it must miss even though its tokens are cached.
    hits, num_hit_tokens, _ = admit(kv, make_request("b", prompt=w + y + [9]))
    assert ids(hits) == [kv.get_block_ids("c")[0]]
    assert num_hit_tokens == 4

    assert hash_block(hash_block(None, x), y) != hash_block(hash_block(None, w), y)
    assert hash_block(None, y) != hash_block(hash_block(None, x), y)
    assert kv.block_pool.get_cached_block(hash_block(None, y)) is None


def test_block_hash_covers_the_tokens_and_the_parent():
    parent = hash_block(None, [1, 2, 3, 4])
    assert hash_block(parent, [5, 6, 7, 8]) == hash_block(parent, [5, 6, 7, 8])
    assert hash_block(parent, [5, 6, 7, 8]) != hash_block(parent, [5, 6, 7, 9])
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [4, 3, 2, 1])


def test_cache_blocks_hashes_only_full_computed_blocks():
    kv = make_kv_cache_manager(num_blocks=8)
    request = make_request("a", num_prompt_tokens=10)
    blocks = kv.block_pool.blocks
    kv.allocate_slots(request, 10)

    request.num_computed_tokens = 6  # a first chunk: block 0 full, block 1 half
    kv.cache_blocks(request)
    assert blocks[0].block_hash == hash_block(None, request.prompt_token_ids[:4])
    assert blocks[1].block_hash is None
    assert kv.num_cached_blocks["a"] == 1

    request.num_computed_tokens = 10  # the whole prompt: block 2 holds 2 of 4 tokens
    kv.cache_blocks(request)
    assert blocks[1].block_hash == hash_block(blocks[0].block_hash, request.prompt_token_ids[4:8])
    assert blocks[2].block_hash is None
    assert kv.num_cached_blocks["a"] == 2

    # Sampled tokens fill block 2; it is hashed once they are computed, not before.
    request.output_token_ids += [7, 8]
    kv.cache_blocks(request)
    assert blocks[2].block_hash is None
    request.num_computed_tokens = 12
    kv.cache_blocks(request)
    assert blocks[2].block_hash == hash_block(blocks[1].block_hash, request.prompt_token_ids[8:] + [7, 8])


def test_cache_blocks_does_not_rehash_prefix_hits():
    kv = make_kv_cache_manager(num_blocks=8)
    shared = list(range(100, 108))
    compute(kv, make_request("a", prompt=shared + [1]))
    b = make_request("b", prompt=shared + [5, 6, 7, 8, 9])
    admit(kv, b)
    assert kv.num_cached_blocks["b"] == 2
    b.num_computed_tokens = 13
    kv.cache_blocks(b)
    assert kv.num_cached_blocks["b"] == 3
    b_tail = kv.req_to_blocks["b"][2]
    assert b_tail.block_hash == hash_block(kv.block_pool.blocks[1].block_hash, [5, 6, 7, 8])


def test_free_keeps_the_request_hashes_and_forget_drops_them():
    kv = make_kv_cache_manager(num_blocks=8)
    a = make_request("a", num_prompt_tokens=9)
    compute(kv, a)
    kv.free(a)
    assert len(kv.req_to_hashes["a"]) == 2  # reused if a is preempted and recomputes
    assert "a" not in kv.num_cached_blocks
    kv.forget(a)
    assert "a" not in kv.req_to_hashes


def test_caching_disabled_never_hits_or_hashes():
    kv = make_kv_cache_manager(num_blocks=8, enable_caching=False)
    prompt = list(range(100, 109))
    compute(kv, make_request("a", prompt=prompt))
    assert all(blk.block_hash is None for blk in kv.block_pool.blocks)
    hits, num_hit_tokens, new_blocks = admit(kv, make_request("b", prompt=prompt))
    assert hits == [] and num_hit_tokens == 0
    assert ids(new_blocks) == [3, 4, 5]
    assert kv.num_prefix_queried_tokens == 0


def test_prefix_hit_statistics_count_tokens_queried_and_hit():
    kv = make_kv_cache_manager(num_blocks=8)
    shared = list(range(100, 108))
    admit_and_compute = [make_request("a", prompt=shared + [1, 2]), make_request("b", prompt=shared + [3])]
    for request in admit_and_compute:
        admit(kv, request)
        request.num_computed_tokens = request.num_tokens
        kv.cache_blocks(request)
    assert kv.num_prefix_queried_tokens == 10 + 9
    assert kv.num_prefix_hit_tokens == 8


def test_prefix_hit_statistics_skip_an_admission_that_runs_out_of_blocks():
    kv = make_kv_cache_manager(num_blocks=3)
    shared = list(range(100, 108))
    compute(kv, make_request("a", prompt=shared))  # counted: 8 queried, 0 hit
    b = make_request("b", prompt=shared[:4] + list(range(200, 208)))
    for _ in range(3):  # b asks again each step while a holds the blocks
        _, num_hit_tokens, new_blocks = admit(kv, b)
        assert num_hit_tokens == 4 and new_blocks is None
    assert kv.num_prefix_queried_tokens == 8
    assert kv.num_prefix_hit_tokens == 0
    kv.free(make_request("a"))
    admit(kv, b)
    assert kv.num_prefix_queried_tokens == 8 + 12
    assert kv.num_prefix_hit_tokens == 4


def test_prefix_hit_statistics_are_not_counted_for_running_requests():
    kv = make_kv_cache_manager(num_blocks=8)
    a = make_request("a", num_prompt_tokens=6)
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    kv.allocate_slots(a, 3)  # the next prefill chunk
    assert kv.num_prefix_queried_tokens == 6
