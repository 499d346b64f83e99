"""Torch-free model shapes: the one source that the loader (engine side) and the planner extend.

``core``: ``ModelShape`` (sizes, validated; KV bytes per token) and ``kv_cache_blocks`` (the KV block
count); ``hf``: a Hugging Face ``config.json`` dict -> shape; ``gguf``: GGUF metadata + tensor table ->
shape. Nothing here imports from ferry's other packages.
"""

from __future__ import annotations

from ferry.shapes.core import DEFAULT_CONTEXT_LENGTH, ModelShape, ShapeError, kv_cache_blocks
from ferry.shapes.gguf import shape_from_gguf
from ferry.shapes.hf import shape_from_hf_config

__all__ = ["DEFAULT_CONTEXT_LENGTH", "ModelShape", "ShapeError", "kv_cache_blocks", "shape_from_gguf",
           "shape_from_hf_config"]
