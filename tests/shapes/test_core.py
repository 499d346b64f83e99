"""ModelShape validation and the two KV formulas, with exact numbers on small made-up shapes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ferry.config import ArchConfig
from ferry.shapes import ModelShape, kv_cache_blocks

# 4 layers, 8 heads of 16 over hidden 128, 2 KV heads: 2 x 4 x 2 x 16 = 256 values of K and V per token
TINY = dict(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512)


def test_head_dim_is_derived_unless_overridden() -> None:
    assert ModelShape(**TINY).head_dim == 16
    assert ModelShape(**TINY, head_dim_override=32).head_dim == 32
    # with an override, hidden_size need not split evenly over the heads (Gemma 2)
    assert ModelShape(**{**TINY, "hidden_size": 100}, head_dim_override=16).head_dim == 16


def test_kv_bytes_per_token_whole_model() -> None:
    shape = ModelShape(**TINY)
    assert shape.kv_bytes_per_token(4) == 2 * 4 * 2 * 16 * 4 == 1024
    assert shape.kv_bytes_per_token(2) == 512
    assert shape.kv_bytes_per_token(0.5) == 128.0


def test_kv_bytes_per_token_per_gpu() -> None:
    shape = ModelShape(**TINY)
    assert shape.kv_bytes_per_token(2, tp=2) == 2 * 4 * 1 * 16 * 2 == 256  # KV heads split
    assert shape.kv_bytes_per_token(2, tp=8) == 256  # more GPUs than KV heads: each holds a whole one
    assert shape.kv_bytes_per_token(2, pp=2) == 256  # layers split
    assert shape.kv_bytes_per_token(2, pp=3) == 2 * 2 * 2 * 16 * 2 == 256  # 4 layers over 3 stages: 2 on the first
    assert shape.kv_bytes_per_token(2, tp=2, pp=4) == 2 * 1 * 1 * 16 * 2 == 64


def test_kv_cache_blocks_is_whole_blocks() -> None:
    # 1024 B per token x 16 tokens = 16 KiB per block
    assert kv_cache_blocks(16 * 1024, 16, 1024) == 1
    assert kv_cache_blocks(16 * 1024 - 1, 16, 1024) == 0
    assert kv_cache_blocks(1_000_000, 16, 1024) == 61
    assert kv_cache_blocks(1_000_000, 32, 1024) == 30
    assert kv_cache_blocks(1000.0, 1, 64.0) == 15
    assert isinstance(kv_cache_blocks(1000.0, 1, 64.0), int)
    with pytest.raises(ValueError, match="block_size"):
        kv_cache_blocks(1000, 0, 64)
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        kv_cache_blocks(1000, 16, 0)


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("hidden_size", -1), ("num_hidden_layers", 2.0),
                                         ("max_position_embeddings", True), ("num_key_value_heads", None),
                                         ("head_dim_override", 0)])
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        ModelShape(**{**TINY, field: value})  # type: ignore[arg-type]


def test_heads_must_split_evenly() -> None:
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelShape(**{**TINY, "num_key_value_heads": 3})
    # hidden_size over the heads rounds down, as in transformers; the engine's ArchConfig refuses it
    assert ModelShape(**{**TINY, "hidden_size": 100}).head_dim == 12
    with pytest.raises(ValueError, match="hidden_size must be a multiple of num_attention_heads"):
        ArchConfig(architecture="LlamaForCausalLM", **{**TINY, "hidden_size": 100})
    stated = ArchConfig(architecture="LlamaForCausalLM", **{**TINY, "hidden_size": 100}, head_dim_override=16)
    assert stated.head_dim == 16


def test_fields_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        ModelShape(100, 128, 256, 4, 8, 2, 512)  # type: ignore[misc]
    shape = ModelShape(**TINY)
    with pytest.raises(AttributeError):
        shape.hidden_size = 64  # type: ignore[misc]


def test_shapes_import_neither_torch_nor_gguf() -> None:
    code = "import sys, ferry.shapes; print(sorted(m for m in ('torch', 'gguf', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
