"""The KV cache's tensors: a zeroed (K, V) pair per layer, committed page by page on CPU."""

from __future__ import annotations

import math
import mmap

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]


def zeroed_pool(num_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of zeros whose pages are committed when first written.

    NOTE: ``torch.zeros`` writes every page at start, so a server's resident size would be its
    whole KV budget from the first second; an anonymous mapping reads as zeros (the masked
    attention paths rely on that: a NaN in a stale slot would survive a zero weight) and costs
    memory only for the blocks in use.
    """
    buffer = mmap.mmap(-1, max(num_bytes, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=num_bytes // dtype.itemsize)


def kv_tensors(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> list[KVCache]:
    """A (K, V) pair of zero tensors of ``shape`` per layer; on CPU, slices of one ``zeroed_pool``."""
    if device.type != "cpu":
        return [(torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
    per_tensor = math.prod(shape)
    pool = zeroed_pool(2 * num_layers * per_tensor * dtype.itemsize, dtype)
    parts = pool.view(num_layers, 2, *shape)
    return [(parts[i, 0], parts[i, 1]) for i in range(num_layers)]
