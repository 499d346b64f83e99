"""Block pool and KV cache manager: exact block ids, ref counts, hash hits and eviction order."""

from __future__ import annotations

import pytest

from ferry.batch.request import Request
from ferry.engine.kv_cache import BlockPool, KVCacheManager
from ferry.engine.kv_cache.hashing import extend_block_hashes, hash_block
from ferry.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), (), max_tokens)


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_chained_hash_depends_on_the_prefix() -> None:
    a = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8], 8, BS)
    b = extend_block_hashes([], [9, 2, 3, 4, 5, 6, 7, 8], 8, BS)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1]  # same tokens in block 1, different parent
    assert a[1] == hash_block(a[0], [5, 6, 7, 8])
    assert extend_block_hashes([], [1, 2, 3], 3, BS) == []  # partial blocks are never hashed


def test_pool_allocates_in_order_and_frees_to_the_lru_tail() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.free_block_ids() == [3]
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_ids() == [3, 2, 1, 0]
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([blocks[0]])
    with pytest.raises(ValueError):
        pool.get_new_blocks(5)


def test_allocate_slots_exact_block_ids_and_free() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    r.output_token_ids.append(99)
    assert kv.allocate_slots(r, 1)  # token 10 still fits block 2
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 11
    r.output_token_ids.extend([98])
    assert kv.allocate_slots(r, 1)
    r.num_computed_tokens = 12
    r.output_token_ids.append(97)
    assert kv.allocate_slots(r, 1)  # token 12 opens block 3
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.free(r)
    assert kv.block_ids("a") == []
    # Tail first: the last block of the freed request is evicted first.
    assert kv.pool.free_block_ids()[:4] == [4, 5, 6, 7]
    assert kv.pool.free_block_ids()[4:] == [3, 2, 1, 0]
    assert_all_free(kv)


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    r = make_request("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.block_ids("a") == []
    assert_all_free(kv)


def test_prefix_hit_shares_blocks_with_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = make_request("a", prompt)
    assert kv.get_computed_blocks(a).num_tokens == 0
    assert kv.allocate_slots(a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", prompt + [7, 7])
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 8
    assert [blk.block_id for blk in hit.blocks] == [0, 1]
    assert kv.allocate_slots(b, 4, hit)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (10 + 12, 8)
    kv.free(a)
    kv.free(b)
    assert_all_free(kv)


def test_whole_prompt_hit_leaves_the_last_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(8))
    a = make_request("a", prompt)
    assert kv.allocate_slots(a, 8)
    b = make_request("b", prompt)
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 4  # block 1 would cover the last token, which must be computed
    kv.free(a)
    assert_all_free(kv)


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))  # blocks 0,1 full + block 2 partial
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    assert kv.pool.free_block_ids() == [3, 2, 1, 0]
    # A hit on a freed block revives it without recomputation.
    b = make_request("b", list(range(8)) + [50])
    hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit.blocks] == [0, 1]
    assert kv.allocate_slots(b, 1, hit)
    assert kv.block_ids("b") == [0, 1, 3]
    kv.free(b)
    # New unrelated tokens take the oldest free blocks first: 2, then 3, then 1 (b's tail first).
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    c = make_request("c", [9] * 12)
    assert kv.allocate_slots(c, 12)
    assert kv.block_ids("c") == [2, 3, 1]
    # Block 1 was evicted (its hash gone), block 0 is still cached.
    d = make_request("d", list(range(8)) + [1])
    assert [blk.block_id for blk in kv.get_computed_blocks(d).blocks] == [0]
    kv.free(c)
    assert_all_free(kv)


def test_hit_on_free_blocks_counts_against_free_space() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)) + [1])
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    b = make_request("b", list(range(8)) + [2] * 8)  # hits 2 free blocks, needs 2 more: 4 > 3
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 8
    assert not kv.allocate_slots(b, 8, hit)
    assert_all_free(kv)
    assert [blk.block_id for blk in kv.get_computed_blocks(b).blocks] == [0, 1]


def test_prefix_caching_off_never_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b).num_tokens == 0
    kv.free(a)
    assert_all_free(kv)


def test_prefix_stats_count_a_request_once_however_long_it_waits() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(100, 110)))
    assert kv.allocate_slots(a, 10, kv.get_computed_blocks(a))
    a.num_cached_tokens = 0  # what the scheduler records at admission
    b = make_request("b", list(range(100, 108)) + [1, 2, 3])  # hits a's 2 full blocks
    for _ in range(3):  # no free block for b's tail: looked up step after step
        assert not kv.allocate_slots(b, 3, kv.get_computed_blocks(b))
    kv.free(a)
    assert kv.allocate_slots(b, 3, kv.get_computed_blocks(b))
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (10 + 11, 8)
    kv.free(b)
    assert_all_free(kv)


def test_sliding_window_frees_blocks_behind_the_window() -> None:
    """Window 6, blocks of 4: a query at position p reads (p - 6, p], so once the next query is at
    position 12 or later, block 0 (positions 0-3) and then block 1 (4-7) are never read again."""
    kv = KVCacheManager(num_blocks=8, block_size=BS, sliding_window=6)
    r = make_request("a", list(range(10)), max_tokens=8)
    assert kv.allocate_slots(r, 10)
    assert kv.block_ids("a") == [0, 1, 2]  # first query at 0: everything is still needed
    r.num_computed_tokens = 10
    r.output_token_ids.append(99)
    assert kv.allocate_slots(r, 1)  # next query at 10 reads (4, 10]: block 0 is done
    assert kv.block_ids("a") == [0, 1, 2] and kv.num_free_blocks == 6
    assert kv._req_blocks["a"][0] is kv._null  # the table keeps its shape; entry 0 is a null entry
    for pos in (11, 12, 13):
        r.num_computed_tokens = pos
        r.output_token_ids.append(pos)
        assert kv.allocate_slots(r, 1)
    # next query at 13 reads (7, 13]: blocks 0 and 1 are done; block 3 was added for position 12
    assert kv.num_free_blocks == 8 - 2
    assert [b is kv._null for b in kv._req_blocks["a"]] == [True, True, False, False]
    kv.free(r)  # null entries are not freed twice
    assert_all_free(kv)


def test_sliding_window_freed_blocks_still_serve_prefix_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, sliding_window=4)
    tokens = list(range(100, 112))
    a = make_request("a", tokens)
    assert kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    a.output_token_ids.append(1)
    assert kv.allocate_slots(a, 1)  # blocks 0 and 1 fall behind the window and are freed, still hashed
    b = make_request("b", tokens + [7])
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 12 and [blk.block_id for blk in hit.blocks][:2] == [0, 1]
    assert kv.allocate_slots(b, 1, hit)
    kv.free(a)
    kv.free(b)
    assert_all_free(kv)


def test_without_a_window_every_block_is_kept() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("a", list(range(16)))
    assert kv.allocate_slots(r, 16)
    r.num_computed_tokens = 16
    r.output_token_ids.append(1)
    assert kv.allocate_slots(r, 1)
    assert kv.block_ids("a") == [0, 1, 2, 3, 4] and kv.num_free_blocks == 3
