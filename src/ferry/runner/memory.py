"""How many KV blocks fit: from a byte budget, never from max_len x max_batch.

The budget is, in order of precedence:

- ``--kv-cache-memory`` bytes, as given;
- ``--gpu-memory-utilization F`` (vLLM's rule): ferry may use ``F x total`` bytes of the device
  (``torch.cuda.mem_get_info``'s total on a GPU, ``MemTotal`` on CPU) for weights + KV cache, so the
  KV budget is ``F x total - weights - UTILIZATION_RESERVE``;
- otherwise a share of free memory (``default_kv_cache_memory``).
"""

from __future__ import annotations

import math

import torch

from ferry.config import ArchConfig, CacheConfig
from ferry.loader.base import expected_weight_shapes
from ferry.shapes import kv_cache_blocks

MiB = 1 << 20
GiB = 1 << 30
# NOTE: on CPU the KV pool shares RAM with everything else, so the default takes a modest share of
# what is available; on a GPU the weights are already resident when this runs.
CPU_DEFAULT_SHARE = 0.10
CPU_DEFAULT_CAP = 2 * GiB
GPU_DEFAULT_SHARE = 0.85
# NOTE: what --gpu-memory-utilization keeps back besides the weights: a step's activations and
# logits, the allocator's slack, and on a GPU the CUDA context. One constant, so that the block
# count a user gets is arithmetic they can redo (docs/server.md).
UTILIZATION_RESERVE = 512 * MiB


def _meminfo(key: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"cannot read {key} from /proc/meminfo")


def available_cpu_memory() -> int:
    return _meminfo("MemAvailable")


def total_device_memory(device: torch.device) -> int:
    """The device's total memory: the GPU's, or the machine's RAM (MemTotal) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return _meminfo("MemTotal")


def free_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_cpu_memory()


def default_kv_cache_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_DEFAULT_SHARE)
    return min(int(available_cpu_memory() * CPU_DEFAULT_SHARE), CPU_DEFAULT_CAP)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dense_weight_bytes(arch: ArchConfig, dtype: torch.dtype) -> int:
    """Bytes of every weight held as ``dtype`` (an upper bound for GGUF blocks kept quantized)."""
    return sum(math.prod(shape) for shape in expected_weight_shapes(arch).values()) \
        * dtype_bytes(dtype)


def resident_weight_bytes(arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The weights' bytes once loaded: what the CUDA allocator holds (the KV pool is not allocated
    yet when this runs), else the dense size."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return dense_weight_bytes(arch, dtype)


def utilization_budget(fraction: float, total: int, weight_bytes: int, free: int) -> int:
    """KV bytes under ``--gpu-memory-utilization``: ``fraction x total - weights - reserve``.

    ValueError (one line) when that leaves nothing, or asks for more than is free right now.
    """
    share = int(fraction * total)
    budget = share - weight_bytes - UTILIZATION_RESERVE
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {fraction} allows {share / GiB:.2f} GiB of "
            f"{total / GiB:.2f} GiB, which the weights ({weight_bytes / GiB:.2f} GiB) and the "
            f"{UTILIZATION_RESERVE // MiB} MiB reserve already take; raise it")
    if budget > free:
        raise ValueError(
            f"--gpu-memory-utilization {fraction} asks for a {budget / GiB:.2f} GiB KV cache but "
            f"only {free / GiB:.2f} GiB is free; lower it (other processes use this memory)")
    return budget


def num_kv_blocks(arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype,
                  device: torch.device, weight_bytes: int | None = None) -> int:
    """Blocks that fit in the budget: ``kv_cache_blocks``, budget // (block_size x KV bytes per token).

    ``weight_bytes``: the loaded weights' size, for ``gpu_memory_utilization``; None measures it
    (``resident_weight_bytes``).
    """
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    if cache.kv_cache_memory is not None:
        budget, flag = cache.kv_cache_memory, "--kv-cache-memory"
    elif cache.gpu_memory_utilization is not None:
        weights = (resident_weight_bytes(arch, dtype, device) if weight_bytes is None
                   else weight_bytes)
        budget = utilization_budget(cache.gpu_memory_utilization, total_device_memory(device),
                                    weights, free_device_memory(device))
        flag = "--gpu-memory-utilization"
    else:
        budget, flag = default_kv_cache_memory(device), "--kv-cache-memory"
    per_token = arch.kv_bytes_per_token(dtype_bytes(dtype))
    blocks = kv_cache_blocks(budget, cache.block_size, per_token)
    if blocks < 1:
        raise ValueError(f"the KV budget of {budget} bytes is smaller than one KV block "
                         f"({cache.block_size * per_token} bytes); raise {flag}")
    return blocks
