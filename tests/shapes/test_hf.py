"""Hugging Face config.json -> shape: defaults, the context-length rule, nesting, rope, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from ferry.shapes import DEFAULT_CONTEXT_LENGTH, ModelShape, ShapeError, shape_from_hf_config
from ferry.shapes.hf import architecture, model_type, rope_from_hf_config, text_config

LLAMA: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
                         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


@dataclass(frozen=True, kw_only=True)
class Named(ModelShape):
    name: str


def test_llama_config() -> None:
    shape = shape_from_hf_config(LLAMA, ModelShape)
    assert shape == ModelShape(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    assert shape.head_dim == 16 and shape.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2 == 256


def test_extra_fields_fill_a_subclass() -> None:
    shape = shape_from_hf_config(LLAMA, Named, name="tiny")
    assert isinstance(shape, Named) and shape.name == "tiny" and shape.hidden_size == 64


def test_kv_heads_default_to_the_heads_and_head_dim_is_kept_only_when_it_differs() -> None:
    cfg = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}
    assert shape_from_hf_config(cfg, ModelShape).num_key_value_heads == 4
    assert shape_from_hf_config({**LLAMA, "head_dim": 16}, ModelShape).head_dim_override is None
    wide = shape_from_hf_config({**LLAMA, "head_dim": 32}, ModelShape)
    assert (wide.head_dim_override, wide.head_dim, wide.kv_bytes_per_token(1)) == (32, 32, 2 * 2 * 2 * 32)


def test_missing_context_length_rule() -> None:
    bare = {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"}
    assert shape_from_hf_config({**bare, "seq_length": 2048}, ModelShape).max_position_embeddings == 2048
    assert shape_from_hf_config({**bare, "max_position_embeddings": None}, ModelShape).max_position_embeddings \
        == DEFAULT_CONTEXT_LENGTH == 4096
    assert shape_from_hf_config(bare, ModelShape).max_position_embeddings == 4096
    # max_position_embeddings wins over seq_length
    assert shape_from_hf_config({**LLAMA, "seq_length": 2048}, ModelShape).max_position_embeddings == 512


def test_tied_embeddings_and_attention_bias_defaults() -> None:
    shape = shape_from_hf_config(LLAMA, ModelShape)
    assert not shape.tie_word_embeddings and not shape.attention_bias
    assert shape_from_hf_config({**LLAMA, "model_type": "gemma2"}, ModelShape).tie_word_embeddings
    assert not shape_from_hf_config({**LLAMA, "model_type": "gemma2", "tie_word_embeddings": False},
                                    ModelShape).tie_word_embeddings
    assert shape_from_hf_config({**LLAMA, "attention_bias": True}, ModelShape).attention_bias
    # Qwen2 has no attention_bias key; its q/k/v always carry a bias (by model_type or by architecture)
    assert shape_from_hf_config({**LLAMA, "model_type": "qwen2"}, ModelShape).attention_bias
    assert shape_from_hf_config({**LLAMA, "model_type": "", "architectures": ["Qwen2ForCausalLM"]},
                                ModelShape).attention_bias


def test_multimodal_text_config() -> None:
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "tie_word_embeddings": True,
           "text_config": {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4}}
    assert text_config(cfg) is cfg["text_config"] and text_config(LLAMA) is LLAMA
    assert (architecture(cfg), model_type(cfg)) == ("LlavaForConditionalGeneration", "llama")
    shape = shape_from_hf_config(cfg, ModelShape)
    assert (shape.vocab_size, shape.num_key_value_heads, shape.head_dim, shape.max_position_embeddings) == (
        1000, 4, 16, 4096)
    assert shape.tie_word_embeddings  # from the outer config when text_config does not say
    assert architecture({"model_type": "llama"}) == ""


def test_missing_or_non_integer_sizes() -> None:
    with pytest.raises(ShapeError, match="^lacks integer vocab_size, intermediate_size, num_hidden_layers, "
                                         "num_attention_heads$"):
        shape_from_hf_config({"model_type": "bert", "hidden_size": 8}, ModelShape)
    with pytest.raises(ShapeError, match="lacks integer hidden_size"):
        shape_from_hf_config({**LLAMA, "hidden_size": "64"}, ModelShape)
    # what is present but wrong is the dataclass's to reject, naming the field
    with pytest.raises(ValueError, match="num_key_value_heads must be a positive integer"):
        shape_from_hf_config({**LLAMA, "num_key_value_heads": 2.5}, ModelShape)


def test_rope_old_keys_and_rope_parameters() -> None:
    assert rope_from_hf_config(LLAMA) == (10000.0, None)
    assert rope_from_hf_config({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}) == (
        500000.0, {"rope_type": "linear", "factor": 2.0})
    assert rope_from_hf_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == (1e6, None)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert rope_from_hf_config({"rope_parameters": {**llama3, "rope_theta": 5e5}}) == (5e5, llama3)
