"""What every loader returns (``LoadedModel``) and the two errors a user can meet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferry.config import ArchConfig
from ferry.kernels.packing import QuantizedTensor
from ferry.tokenizer import Tokenizer


class ModelNotFoundError(ValueError):
    """Unknown built-in name or missing path; the message says how to install or what is accepted."""


class ModelFormatError(ValueError):
    """A corrupt, truncated or unsupported GGUF file or Hugging Face folder."""


@dataclass
class LoadedModel:
    name: str  # the name the user asked for, or the file/folder name
    source: Path  # resolved .gguf file or HF folder
    arch: ArchConfig
    tokenizer: Tokenizer
    # NOTE: a factory, not a dict of tensors: the weights are produced one at a time when the
    # model is built, so the dequantized model is never held twice.
    weight_iter: Callable[[bool], Iterator[tuple[str, torch.Tensor | QuantizedTensor]]] = field(
        repr=False, compare=False)
    # Sampling defaults the model ships (generation_config.json: temperature, top_p, top_k, min_p,
    # repetition_penalty, max_new_tokens...), keyed as in that file; empty when it has none.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # The dtype the checkpoint was saved in (config.json ``torch_dtype``/``dtype``: "bfloat16",
    # "float16", "float32"); None for GGUF files, whose weights are dequantized to float32.
    native_dtype: str | None = None

    def weights(self, keep_quantized: bool = False
                ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """``(hf_name, float32 CPU tensor [out, in])`` one at a time, in file order.

        With ``keep_quantized``, GGUF weights stored as Q4_0, Q4_1 or Q8_0 come as
        ``QuantizedTensor`` (raw blocks, rows in Hugging Face order) instead of float32.

        Names: model.embed_tokens.weight, model.layers.{i}.input_layernorm.weight,
        model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ q/k/v .bias when arch.attention_bias),
        model.layers.{i}.post_attention_layernorm.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
        model.norm.weight and lm_head.weight (omitted when arch.tie_word_embeddings).
        """
        return self.weight_iter(keep_quantized)


def expected_weight_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter ``LoadedModel.weights()`` yields for ``arch``, with its shape ([out, in])."""
    h, d, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    # NOTE: Phi-3 checkpoints hold q/k/v and gate/up fused, in the row order ferry fuses them in.
    fused = arch.architecture in FUSED_PROJECTIONS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        if fused:
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if arch.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if arch.sandwich_norm:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        if fused:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


# architectures whose checkpoints store qkv_proj and gate_up_proj fused
FUSED_PROJECTIONS = frozenset({"Phi3ForCausalLM"})
