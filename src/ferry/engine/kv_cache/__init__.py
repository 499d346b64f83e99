from ferry.engine.kv_cache.block_pool import BlockPool, KVBlock
from ferry.engine.kv_cache.manager import (
    ComputedBlocks,
    KVCacheManager,
    PrefixCacheStats,
)

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "ComputedBlocks", "PrefixCacheStats"]
