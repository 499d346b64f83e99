"""The scheduler's only view of the KV cache: ``get_computed_blocks``, ``allocate_slots``, ``free``,
and ``block_ids`` to hand a scheduled request's block table to the runner.

Sliding-window models (every layer attends only to the last ``sliding_window`` positions, as
Mistral and Phi-3 do) give back the blocks that fell wholly behind the window at each allocation:
their slot in the request's block table becomes a null entry (block id 0, only ever read under
the attention mask), and the block joins the free queue, still hashed, so a later prompt with
the same prefix can hit it. Models that mix sliding and full-attention layers (Gemma) keep every
block: all layers share one block table, and the full layers read the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.batch.request import Request
from ferry.engine.kv_cache.block_pool import BlockPool, KVBlock
from ferry.engine.kv_cache.hashing import extend_block_hashes


@dataclass(frozen=True)
class ComputedBlocks:
    """Prefix-cache hits for a waiting request: opaque to the scheduler but for the token count."""

    blocks: tuple[KVBlock, ...] = ()
    num_tokens: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    queries: int  # prompt tokens looked up
    hits: int  # prompt tokens found cached


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        # the null entry of a block table whose block fell behind the sliding window
        self._null = KVBlock(0, ref_cnt=-1)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._queries = 0
        self._hits = 0

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queries, self._hits)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table, as a new list the caller owns (empty when it holds none)."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the scheduler's API -----------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest run of cached full blocks at the start of the request's tokens.

        NOTE: never the whole sequence: the last token must be computed to get logits, so at most
        ``(num_tokens - 1) // block_size`` blocks can hit.
        """
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return ComputedBlocks()
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes(request, max_blocks * self.block_size)
        hits: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return ComputedBlocks(tuple(hits), len(hits) * self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks = ComputedBlocks()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones.

        Returns False, changing nothing, when the pool lacks free blocks.
        """
        held = self._req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + computed.num_tokens
        num_required = self.num_blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = num_required - len(held) - len(computed.blocks)
        # Hit blocks that sit in the free queue stop being free once touched.
        num_hit_free = sum(1 for b in computed.blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_hit_free:
            if not held:
                del self._req_blocks[request.request_id]
            return False
        if request.num_cached_tokens < 0:
            # NOTE: counted when the request is first admitted, not at each lookup: a request that
            # waits for free blocks is looked up again every step.
            self._queries += request.num_tokens
            self._hits += computed.num_tokens
        self.pool.touch(computed.blocks)
        held.extend(computed.blocks)
        if num_new_blocks > 0:
            held.extend(self.pool.get_new_blocks(num_new_blocks))
        self._cache_full_blocks(request, held, num_computed + num_new_tokens)
        if self.sliding_window is not None:
            self._free_behind_window(held, num_computed)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks. Tail blocks are queued first so they are evicted first."""
        blocks = self._req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(b for b in reversed(blocks) if b is not self._null)

    def reset_prefix_cache(self) -> None:
        """Forget every block hash (after a failed step: blocks are registered when scheduled, so
        the failed step's hashes name KV that was never written). Live requests' full blocks are
        registered again at their next allocation."""
        self.pool.reset_prefix_cache()

    # -- internals ---------------------------------------------------------------------------
    def _hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        hashes = request.block_hashes
        if len(hashes) < num_tokens // self.block_size:
            extend_block_hashes(hashes, request.token_ids(0, num_tokens), num_tokens,
                                self.block_size)
        return hashes

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        # NOTE: blocks are registered when their tokens are *scheduled*: the model writes every
        # layer's K/V for the whole batch before that layer's attention reads, so another request
        # in the same step may already hit them.
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full == 0 or blocks[num_full - 1].block_hash is not None:
            return
        hashes = self._hashes(request, num_full * self.block_size)
        for i in range(num_full):
            if blocks[i].block_hash is None and blocks[i] is not self._null:
                self.pool.cache_block(blocks[i], hashes[i])

    def _free_behind_window(self, held: list[KVBlock], num_computed: int) -> None:
        """Free the blocks no query from position ``num_computed`` on can read.

        A query at position p reads keys in (p - window, p]; the earliest query still to come is
        at ``num_computed``, so blocks ending before ``num_computed - window + 1`` are done.
        """
        assert self.sliding_window is not None
        first_needed = num_computed - self.sliding_window + 1
        done = [i for i in range(min(max(first_needed, 0) // self.block_size, len(held)))
                if held[i] is not self._null]
        if done:
            self.pool.free_blocks(held[i] for i in done)
            for i in done:
                held[i] = self._null
