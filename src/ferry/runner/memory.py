"""How many KV blocks fit: from a byte budget, never from max_len x max_batch."""

from __future__ import annotations

import torch

from ferry.config import ArchConfig, CacheConfig
from ferry.shapes import kv_cache_blocks

GiB = 1 << 30
# NOTE: on CPU the KV pool shares RAM with everything else, so the default takes a modest share of
# what is available; on a GPU the weights are already resident when this runs.
CPU_DEFAULT_SHARE = 0.10
CPU_DEFAULT_CAP = 2 * GiB
GPU_DEFAULT_SHARE = 0.85


def available_cpu_memory() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def default_kv_cache_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_DEFAULT_SHARE)
    return min(int(available_cpu_memory() * CPU_DEFAULT_SHARE), CPU_DEFAULT_CAP)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def num_kv_blocks(arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype,
                  device: torch.device) -> int:
    """Blocks that fit in the budget: ``kv_cache_blocks``, budget // (block_size x KV bytes per token)."""
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    budget = cache.kv_cache_memory or default_kv_cache_memory(device)
    per_token = arch.kv_bytes_per_token(dtype_bytes(dtype))
    blocks = kv_cache_blocks(budget, cache.block_size, per_token)
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one KV block "
                         f"({cache.block_size * per_token} bytes); raise --kv-cache-memory")
    return blocks
