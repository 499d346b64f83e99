"""GGUF metadata + tensor table -> shape: the same shape as the equivalent config.json, defaults, errors."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.shapes import ModelShape, ShapeError, shape_from_gguf, shape_from_hf_config
from ferry.shapes.gguf import gguf_value, rope_from_gguf

META: dict[str, Any] = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
                        "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                        "llama.attention.head_count_kv": 2, "llama.context_length": 512}
TENSORS: dict[str, tuple[int, ...]] = {"token_embd.weight": (100, 64), "output.weight": (100, 64),
                                       "blk.0.attn_q.weight": (64, 64)}


def test_same_shape_as_the_config_json() -> None:
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    shape = shape_from_gguf(META, TENSORS, ModelShape)
    assert shape == shape_from_hf_config(hf, ModelShape)
    assert shape.kv_bytes_per_token(4) == 2 * 2 * 2 * 16 * 4 == 512


def test_vocab_tied_bias_and_head_dim_from_the_tensor_table() -> None:
    assert shape_from_gguf({**META, "llama.vocab_size": 120}, TENSORS, ModelShape).vocab_size == 120
    tied = shape_from_gguf(META, {"token_embd.weight": (100, 64), "blk.0.attn_q.bias": (64,)}, ModelShape)
    assert tied.tie_word_embeddings and tied.attention_bias
    assert shape_from_gguf({**META, "llama.attention.key_length": 16}, TENSORS, ModelShape).head_dim_override is None
    assert shape_from_gguf({**META, "llama.attention.key_length": 32}, TENSORS, ModelShape).head_dim == 32


def test_defaults_for_kv_heads_and_context_length() -> None:
    meta = {k: v for k, v in META.items() if k not in ("llama.attention.head_count_kv", "llama.context_length")}
    shape = shape_from_gguf(meta, TENSORS, ModelShape)
    assert (shape.num_key_value_heads, shape.max_position_embeddings) == (4, 4096)


def test_per_layer_lists_must_repeat_one_value() -> None:
    assert shape_from_gguf({**META, "llama.attention.head_count_kv": [2, 2]}, TENSORS,
                           ModelShape).num_key_value_heads == 2
    with pytest.raises(ShapeError, match=r"^has llama.attention.head_count_kv varying per layer \(\[2, 4\]\)"):
        shape_from_gguf({**META, "llama.attention.head_count_kv": [2, 4]}, TENSORS, ModelShape)


def test_missing_and_invalid_values() -> None:
    meta = {k: v for k, v in META.items() if k != "llama.block_count"}
    with pytest.raises(ShapeError, match="^lacks llama.block_count$"):
        shape_from_gguf(meta, TENSORS, ModelShape)
    with pytest.raises(ShapeError, match="^lacks llama.vocab_size$"):
        shape_from_gguf(META, {}, ModelShape)
    with pytest.raises(ShapeError, match="^has an invalid llama.block_count value 'two'$"):
        shape_from_gguf({**META, "llama.block_count": "two"}, TENSORS, ModelShape)
    assert gguf_value(META, "rope.freq_base", 10000.0, kind=float) == 10000.0


def test_rope() -> None:
    assert rope_from_gguf(META) == (10000.0, None)
    assert rope_from_gguf({**META, "llama.rope.freq_base": 5e5, "llama.rope.scaling.type": "yarn",
                           "llama.rope.scaling.factor": 4.0, "llama.rope.scaling.original_context_length": 8192}) == (
        5e5, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192})
    assert rope_from_gguf({**META, "llama.rope.scaling.type": "none"}) == (10000.0, None)
    assert rope_from_gguf({**META, "llama.rope.scale_linear": 2.0}) == (10000.0, {"rope_type": "linear", "factor": 2.0})
