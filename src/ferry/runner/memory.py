"""How many KV blocks fit: from a byte budget, never from max_len x max_batch.

The budget is, in order of precedence:

- ``--kv-cache-memory`` bytes, as given;
- ``--gpu-memory-utilization F`` (vLLM's rule): ferry may use ``F x total`` bytes of the device
  (``torch.cuda.mem_get_info``'s total on a GPU, ``MemTotal`` on CPU) for weights + KV cache, so the
  KV budget is ``F x total - weights - UTILIZATION_RESERVE``;
- otherwise what ``max_num_seqs`` sequences of ``max_model_len`` tokens can use, capped by a share of
  free memory (``default_kv_cache_memory``).

On CPU the pool is one anonymous mapping (``ferry.model.kv_tensors``): the kernel hands out zero pages as blocks
are first written, so the resident size grows with the blocks in use, not with the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ferry.config import ArchConfig, CacheConfig
from ferry.loader.base import expected_weight_shapes
from ferry.shapes import kv_cache_blocks

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class KVBudget:
    bytes: int
    reason: str  # for the start-up log: where the figure comes from
    flag: str  # the flag that changes it


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def default_kv_cache_memory(device: torch.device, demand: int | None = None) -> KVBudget:
    """What ``demand`` bytes (max_num_seqs x max_model_len tokens of KV) need, capped by a share of
    free memory; without a demand, that share."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap, cap_reason = int(free * GPU_DEFAULT_SHARE), f"{GPU_DEFAULT_SHARE:.0%} of free GPU memory"
    else:
        share = int(available_cpu_memory() * CPU_DEFAULT_SHARE)
        cap = min(share, CPU_DEFAULT_CAP)
        cap_reason = (f"{CPU_DEFAULT_SHARE:.0%} of available RAM" if share <= CPU_DEFAULT_CAP
                      else f"the {_gib(CPU_DEFAULT_CAP)} CPU cap")
    if demand is not None and demand <= cap:
        return KVBudget(demand, f"max_num_seqs x max_model_len need {_gib(demand)}, under "
                                f"{cap_reason} ({_gib(cap)})", "--kv-cache-memory")
    why = f"{cap_reason}" if demand is None else (
        f"{cap_reason}; max_num_seqs x max_model_len would need {_gib(demand)}")
    return KVBudget(cap, why, "--kv-cache-memory")


def dense_weight_bytes(arch: ArchConfig, dtype: torch.dtype) -> int:
    """Bytes of every weight held as ``dtype`` (an upper bound for GGUF blocks kept quantized)."""
    return sum(math.prod(shape) for shape in expected_weight_shapes(arch).values()) \
        * dtype.itemsize


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


def kv_bytes_per_token(arch: ArchConfig, dtype: torch.dtype, draft: ArchConfig | None = None) -> int:
    """KV bytes one token takes in the pool: the model's, plus a draft model's, whose KV tensors
    are indexed by the same block ids (speculative decoding with a draft)."""
    return arch.kv_bytes_per_token(dtype.itemsize) + (
        0 if draft is None else draft.kv_bytes_per_token(dtype.itemsize))


def kv_budget(arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device,
              weight_bytes: int | None = None, demand_tokens: int | None = None,
              draft: ArchConfig | None = None) -> KVBudget:
    """The KV pool's bytes and why (see the module's docstring for the precedence). ``draft``: a
    draft model whose KV shares the pool's blocks (and, on a GPU, whose weights load after it)."""
    if cache.kv_cache_memory is not None:
        return KVBudget(cache.kv_cache_memory, "--kv-cache-memory", "--kv-cache-memory")
    if cache.gpu_memory_utilization is not None:
        weights = (resident_weight_bytes(arch, dtype, device) if weight_bytes is None
                   else weight_bytes)
        if draft is not None and device.type == "cuda":
            weights += dense_weight_bytes(draft, dtype)  # NOTE: loaded after the pool is sized
        budget = utilization_budget(cache.gpu_memory_utilization, total_device_memory(device),
                                    weights, free_device_memory(device))
        return KVBudget(budget, f"--gpu-memory-utilization {cache.gpu_memory_utilization}",
                        "--gpu-memory-utilization")
    per_token = kv_bytes_per_token(arch, dtype, draft)
    demand = None
    if demand_tokens is not None:  # whole blocks: each sequence rounds up to its last block
        demand = -(-demand_tokens // cache.block_size) * cache.block_size * per_token
    return default_kv_cache_memory(device, demand)


def num_kv_blocks(arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype,
                  device: torch.device, weight_bytes: int | None = None,
                  demand_tokens: int | None = None, draft: ArchConfig | None = None) -> int:
    """Blocks that fit in the budget: ``kv_cache_blocks``, budget // (block_size x KV bytes per token).

    ``weight_bytes``: the loaded weights' size, for ``gpu_memory_utilization``; None measures it
    (``resident_weight_bytes``). ``demand_tokens``: max_num_seqs x max_model_len, which bounds the
    default budget. ``draft``: a draft model's architecture, whose KV per token the budget holds
    too. The start-up log says which rule chose the size.
    """
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    budget = kv_budget(arch, cache, dtype, device, weight_bytes, demand_tokens, draft)
    per_token = kv_bytes_per_token(arch, dtype, draft)
    blocks = kv_cache_blocks(budget.bytes, cache.block_size, per_token)
    if blocks < 1:
        raise ValueError(f"the KV budget of {budget.bytes} bytes is smaller than one KV block "
                         f"({cache.block_size * per_token} bytes); raise {budget.flag}")
    logger.info("KV pool budget %s: %s (%s changes it)", _gib(budget.bytes), budget.reason,
                budget.flag)
    return blocks
