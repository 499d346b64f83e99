"""Before ``ferry serve`` opens its port: the model can be had, ferry can run it, and it fits.

``check`` downloads what is missing (Hub repo ids), reads the config and tokenizer through
``load_model`` (weights stay on disk: they are read lazily), and compares what the engine will hold
against the memory available: the weights as ferry keeps them plus the KV cache of at least one
sequence of the model's context. Every failure is a ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ferry.config import EngineConfig
from ferry.kernels.packing import KERNEL_TYPES
from ferry.loader import LoadedModel, load_path, load_tokenizer, locate_model
from ferry.runner.memory import dense_weight_bytes, free_device_memory
from ferry.runner.model_runner import resolve_device

logger = logging.getLogger(__name__)
GiB = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$")


class InsufficientMemoryError(ValueError):
    """The weights plus the smallest useful KV cache do not fit in the device's available memory."""


@dataclass(frozen=True)
class MemoryNeed:
    """What the engine will hold, in bytes, and what is available on its device."""

    weights_bytes: int
    kv_bytes: int
    kv_tokens: int  # the KV term covers this many tokens (one sequence of the served context)
    available_bytes: int
    device: str
    weight_format: str  # how the weights are counted: "float32", "GGUF blocks + float32", ...

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes


def check(config: EngineConfig, *, available_memory: Callable[[torch.device], int] | None = None) -> None:
    """Resolve (download) the model, read its config, and refuse to start when it cannot fit.

    ``available_memory`` replaces the probe of free memory (MemAvailable on CPU, free CUDA memory)
    with a function of the device: tests pass a fixed budget.
    """
    m = config.model
    path = locate_model(m.model, revision=m.revision, download_dir=m.download_dir, gguf_file=m.gguf_file)
    loaded = load_path(path, name=m.model)
    if m.tokenizer is not None:
        load_tokenizer(m.tokenizer, download_dir=m.download_dir)
    device = resolve_device(m.device)
    available = (available_memory or free_device_memory)(device)
    need = estimate(config, loaded, path, device, available)
    logger.info("memory: weights %.2f GiB (%s) + KV %.2f GiB for %d tokens = %.2f GiB of %.2f GiB "
                "available on %s", need.weights_bytes / GiB, need.weight_format, need.kv_bytes / GiB,
                need.kv_tokens, need.total_bytes / GiB, need.available_bytes / GiB, need.device)
    if not need.fits:
        raise InsufficientMemoryError(
            f"{loaded.name} needs {need.total_bytes / GiB:.2f} GiB of {need.device} memory (weights "
            f"{need.weights_bytes / GiB:.2f} GiB as {need.weight_format} + KV {need.kv_bytes / GiB:.2f} GiB "
            f"for {need.kv_tokens} tokens) but {need.available_bytes / GiB:.2f} GiB is available; "
            "lower --max-model-len, pick a smaller model or quant, or a smaller --dtype")


def estimate(config: EngineConfig, loaded: LoadedModel, path: Path, device: torch.device,
             available: int) -> MemoryNeed:
    """Weights as ferry holds them + KV for one sequence of ``min(max_model_len, context)`` tokens.

    ``path`` is the model as located (a split GGUF's first shard, by its own name: ``loaded.source``
    may be the cache's blob it links to)."""
    m = config.model
    if m.dtype not in _DTYPES:  # "auto": what the engine will pick for this model and device
        from ferry.engine.llm_engine import resolve_dtype

        m = dataclasses.replace(m, dtype=resolve_dtype(m.dtype, device, loaded.native_dtype))
    dtype = _DTYPES[m.dtype]
    dtype_bytes = dtype.itemsize
    # NOTE: the runner keeps GGUF blocks packed only where its kernels run: float32 on CPU with
    # --weight-format auto (runner/model_runner.py); everywhere else every weight is dequantized.
    packed = m.weight_format == "auto" and device.type == "cpu" and m.dtype == "float32"
    if path.is_file():
        weights = _gguf_weight_bytes(path, dtype_bytes, packed)
        fmt = f"GGUF blocks + {m.dtype}" if packed else m.dtype
    else:
        weights = dense_weight_bytes(loaded.arch, dtype)
        fmt = m.dtype
    context = loaded.arch.max_position_embeddings
    tokens = min(m.max_model_len, context) if m.max_model_len is not None else context
    kv = tokens * loaded.arch.kv_bytes_per_token(dtype_bytes)
    if config.cache.kv_cache_memory is not None and config.cache.kv_cache_memory > kv:
        # NOTE: an explicit pool size is what the engine allocates, however short the context.
        tokens = config.cache.kv_cache_memory // loaded.arch.kv_bytes_per_token(dtype_bytes)
        kv = config.cache.kv_cache_memory
    return MemoryNeed(weights, kv, tokens, available, str(device), fmt)


def _gguf_weight_bytes(path: Path, dtype_bytes: int, packed: bool) -> int:
    """Kernel types (``packing.KERNEL_TYPES`` matrices) at their block bytes when packed, every
    other tensor at ``dtype_bytes`` per element; every shard of a split file."""
    from gguf import (
        GGUFReader,  # NOTE: only GGUF models pay for reading the tensor table again
    )

    total = 0
    for shard in _gguf_shards(path):
        for t in GGUFReader(str(shard)).tensors:
            if packed and t.tensor_type in KERNEL_TYPES and len(t.shape) == 2:
                total += int(t.n_bytes)
            else:
                total += int(t.n_elements) * dtype_bytes
    return total


def _gguf_shards(path: Path) -> list[Path]:
    match = _SHARD.match(path.name)
    if match is None:
        return [path]
    total = int(match["total"])
    return [path.with_name(f"{match['stem']}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]
