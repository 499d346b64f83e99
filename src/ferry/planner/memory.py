"""Memory: weight bytes, KV bytes per token, runtime and activation overhead, KV tokens that fit, and the
smallest parallel layout (tensor parallel within a node, pipeline stages across nodes) that fits.

Per GPU of a replica with ``tp`` x ``pp`` GPUs::

    usable = memory x utilization
           = weights / (tp x pp) + runtime overhead + activations + KV pool
    KV pool -> blocks of ``block_size`` tokens; tokens = blocks x block_size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ferry.planner.catalog import GIB, DtypeSpec, GpuSpec, ModelSpec
from ferry.planner.errors import PlannerError
from ferry.planner.text import plural
from ferry.shapes import ModelShape, kv_cache_blocks


def kv_token_capacity(shape: ModelShape, kv_cache_memory: int, block_size: int = 16,
                      kv_dtype_bytes: int = 4) -> int:
    """KV tokens a pool of ``kv_cache_memory`` bytes holds: whole blocks only, exactly as the engine sizes it.

    ``num_blocks = kv_cache_blocks(kv_cache_memory, block_size, kv_bytes_per_token)`` (``ferry.shapes``, the
    engine's formula); tokens = blocks x block_size. ``shape``: an engine ``ArchConfig`` or a ``ModelSpec``.
    """
    if kv_cache_memory < 0:
        raise PlannerError(f"kv_cache_memory must be >= 0, got {kv_cache_memory}")
    if block_size <= 0:
        raise PlannerError(f"block_size must be positive, got {block_size}")
    return kv_cache_blocks(kv_cache_memory, block_size, shape.kv_bytes_per_token(kv_dtype_bytes)) * block_size


def weight_bytes(model: ModelSpec, dtype: DtypeSpec) -> float:
    """All weights at a storage format; a GGUF at its own format gives the file's exact tensor bytes."""
    # NOTE: quantized checkpoints often keep embeddings and norms in 16 bits; the bits-per-weight
    # averages in dtypes.yaml come from whole files, so they already include that mix.
    if model.file_weight_bytes is not None and model.file_type == dtype.name:
        return float(model.file_weight_bytes)
    return model.total_params * dtype.bytes


def activation_bytes(model: ModelSpec, tp: int, compute_bytes: int, max_num_batched_tokens: int,
                     max_num_seqs: int) -> float:
    """Peak activation memory per GPU for one forward of ``max_num_batched_tokens`` tokens (estimate).

    Live at once in a layer: residual + normed input + attention output (~4 x hidden), this GPU's q/k/v
    and its gated-MLP intermediates (2 x intermediate / tp); plus fp32 logits for one token per sequence
    (the LM head is split over tp).
    """
    inter = (model.moe_intermediate_size or model.intermediate_size) * model.num_experts_per_tok \
        if model.is_moe else model.intermediate_size
    qkv = (model.num_attention_heads + 2 * model.num_key_value_heads) * model.head_dim
    per_token = 4 * model.hidden_size + (qkv + 2 * inter) / tp
    logits = min(max_num_seqs, max_num_batched_tokens) * model.vocab_size * 4 / tp
    return max_num_batched_tokens * per_token * compute_bytes + logits


@dataclass(frozen=True)
class MemoryPlan:
    """Where one replica's memory goes (per GPU) and what it buys."""

    tp: int
    pp: int
    weight_bytes: float  # whole model
    kv_bytes_per_token: float  # whole model, all layers
    per_gpu_weight_bytes: float
    per_gpu_overhead_bytes: float  # runtime
    per_gpu_activation_bytes: float
    per_gpu_kv_bytes: float  # the KV pool on each GPU
    per_gpu_usable_bytes: float
    kv_tokens: int  # KV tokens the replica holds (whole blocks)
    block_size: int
    context: int
    max_concurrent_seqs: int  # sequences of ``context`` tokens that fit at once

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def seqs_of(self, tokens: int) -> int:
        """Sequences of ``tokens`` tokens that fit at once (each holds whole blocks)."""
        return self.kv_tokens // (math.ceil(tokens / self.block_size) * self.block_size)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpus": self.gpus}


def _tp_degrees(model: ModelSpec, gpu: GpuSpec) -> list[int]:
    """Powers of two up to one node that split the attention heads evenly."""
    degrees, tp = [], 1
    while tp <= gpu.gpus_per_node:
        if model.num_attention_heads % tp == 0:
            degrees.append(tp)
        tp *= 2
    return degrees


def plan_memory(model: ModelSpec, gpu: GpuSpec, dtype: DtypeSpec, kv_dtype: DtypeSpec, context: int, *,
                memory_utilization: float = 0.9, kv_cache_memory: int | None = None, block_size: int = 16,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, max_nodes: int = 16,
                max_tp: int | None = None) -> MemoryPlan:
    """The smallest replica (fewest GPUs; tp before pp) whose KV pool holds one ``context``-token sequence.

    ``max_tp`` and ``max_nodes`` bound the search (``max_tp=1, max_nodes=1``: one GPU, as ``ferry serve`` runs).

    ``kv_cache_memory`` fixes the KV pool per GPU (as ``ferry serve --kv-cache-memory`` does) instead of
    giving the KV cache everything left after weights, overhead and activations.
    """
    if context <= 0:
        raise PlannerError(f"context must be positive, got {context}")
    if context > model.max_position_embeddings:
        raise PlannerError(f"context {context} exceeds {model.name}'s maximum of {model.max_position_embeddings}")
    if not 0 < memory_utilization <= 1:
        raise PlannerError(f"memory utilization must be in (0, 1], got {memory_utilization}")
    weights = weight_bytes(model, dtype)
    compute_bytes = 4 if dtype.compute == "fp32" else 2
    usable = gpu.memory_bytes * memory_utilization
    overhead = gpu.runtime_overhead_gib * GIB
    need_tokens = math.ceil(context / block_size) * block_size
    for pp in range(1, max_nodes + 1):
        if pp > model.num_hidden_layers:
            break
        for tp in _tp_degrees(model, gpu):
            if max_tp is not None and tp > max_tp:
                break
            act = activation_bytes(model, tp, compute_bytes, max_num_batched_tokens, max_num_seqs)
            free = usable - weights / (tp * pp) - overhead - act
            pool = free if kv_cache_memory is None else float(kv_cache_memory)
            if pool > free or pool <= 0:
                continue
            # NOTE: each GPU holds its share of the KV heads (split over tp) and of the layers (over pp).
            kv_per_token_gpu = model.kv_bytes_per_token(kv_dtype.bytes, tp=tp, pp=pp)
            tokens = kv_cache_blocks(pool, block_size, kv_per_token_gpu) * block_size
            if tokens < need_tokens:
                continue
            return MemoryPlan(
                tp=tp, pp=pp, weight_bytes=weights, kv_bytes_per_token=model.kv_bytes_per_token(kv_dtype.bytes),
                per_gpu_weight_bytes=weights / (tp * pp), per_gpu_overhead_bytes=overhead,
                per_gpu_activation_bytes=act, per_gpu_kv_bytes=pool, per_gpu_usable_bytes=usable,
                kv_tokens=tokens, block_size=block_size, context=context,
                max_concurrent_seqs=tokens // need_tokens)
    what = f"a {kv_cache_memory}-byte KV pool" if kv_cache_memory is not None else f"one {context}-token sequence"
    where = (f"one {gpu.name}" if max_tp == 1 and max_nodes == 1
             else f"{plural(max_nodes, 'node')} of {gpu.gpus_per_node} x {gpu.name}")
    raise PlannerError(
        f"{model.name} in {dtype.name} ({weights / 1e9:.1f} GB of weights) with {what} does not fit on "
        f"{where}; try a smaller --dtype or --context")
