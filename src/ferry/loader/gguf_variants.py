"""What sets each GGUF architecture apart, as llama.cpp's converter writes it: the HF architecture
it stands for, tensor names, and the ``ArchConfig`` variant fields read from ``{arch}.*`` metadata
and from the few tensors that carry configuration (``rope_freqs``, Phi-3's rope factors).

Conventions of llama.cpp this follows:
- Gemma's norm weights are stored with the 1 of ``(1 + weight)`` already added;
- Gemma 2 and 3 have no ``query_pre_attn_scalar``: the scale is ``head_dim ** -0.5``, except for
  the 27B models (46 and 62 layers), which use ``(hidden / heads) ** -0.5``;
- Gemma 2's sliding layers are the even ones; Gemma 3's are five of every six, with rope base
  10000 and no scaling on them;
- Llama 3's rope scaling is a ``rope_freqs`` tensor of per-frequency divisors, not metadata;
- Phi-3 keeps q/k/v fused in ``attn_qkv`` and gate/up fused in ``ffn_up``;
- Mistral is written as ``llama`` without its sliding window: such a file attends to everything,
  as llama.cpp does; ``llama.attention.sliding_window``, when present, is honoured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ferry.loader.base import ModelFormatError
from ferry.shapes.gguf import gguf_value

# GGUF general.architecture -> the Hugging Face architecture ferry runs it as
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}
# architectures whose q/k rows llama.cpp stores in GGML's interleaved rope order
ROPE_PERMUTED = frozenset({"llama"})
# tensors that configure rather than hold parameters (read by ``variant_fields``)
CONFIG_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_BLOCK = {**_LLAMA_BLOCK, **_QK_NORM, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_PHI3_BLOCK = {**_LLAMA_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_BLOCK_NAMES = {"qwen3": {**_LLAMA_BLOCK, **_QK_NORM}, "gemma2": _GEMMA_BLOCK, "gemma3": _GEMMA_BLOCK,
                "phi3": _PHI3_BLOCK}

_GEMMA27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0


def block_names(arch: str) -> dict[str, str]:
    """GGUF block tensor stem (``attn_q``) -> HF module path (``self_attn.q_proj``)."""
    return _BLOCK_NAMES.get(arch, _LLAMA_BLOCK)


def variant_fields(fields: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
                   read_vector: Callable[[str], list[float]]) -> dict[str, Any]:
    """``ArchConfig`` keyword arguments beyond the shape (``read_vector`` reads a small tensor)."""
    arch = str(fields.get("general.architecture"))
    out: dict[str, Any] = {}
    if "rope_freqs.weight" in tensors:
        out["rope_freq_factors"] = tuple(read_vector("rope_freqs.weight"))
    window = fields.get(f"{arch}.attention.sliding_window")
    if arch == "llama" and window:
        # NOTE: llama.cpp's converter drops Mistral's window (and llama.cpp attends to everything);
        # a file that does carry the key gets the window on every layer, as the HF model has it.
        out["sliding_window"] = int(window)
    if arch == "qwen3":
        out["qk_norm"] = True
    elif arch in ("gemma2", "gemma3"):
        out.update(_gemma(arch, fields))
    elif arch == "phi3":
        if window:  # NOTE: llama.cpp writes 0 for a Phi-3 without a window
            out["sliding_window"] = int(window)
        if "rope_factors_long.weight" in tensors:
            out["rope_scaling"] = _longrope(fields, read_vector)
        rope_dims = fields.get("phi3.rope.dimension_count")
        heads = gguf_value(fields, "attention.head_count")
        if rope_dims is not None and int(rope_dims) != gguf_value(fields, "embedding_length") // heads:
            raise ModelFormatError(f"phi3 with partial rotary ({rope_dims} rope dimensions) is not supported")
    return out


def _gemma(arch: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    hidden = gguf_value(fields, "embedding_length")
    heads = gguf_value(fields, "attention.head_count")
    layers = gguf_value(fields, "block_count")
    head_dim = gguf_value(fields, "attention.key_length", hidden // heads)
    scalar = hidden // heads if layers == _GEMMA27B_LAYERS[arch] else head_dim
    out: dict[str, Any] = {
        "sandwich_norm": True, "hidden_act": "gelu_pytorch_tanh", "embedding_scale": math.sqrt(hidden),
        "query_pre_attn_scalar": float(scalar), "qk_norm": arch == "gemma3",
        "attn_logit_softcapping": _optional_float(fields, f"{arch}.attn_logit_softcapping"),
        "final_logit_softcapping": _optional_float(fields, f"{arch}.final_logit_softcapping"),
    }
    window = fields.get(f"{arch}.attention.sliding_window")
    if not window:
        return out
    if arch == "gemma2":
        sliding = tuple(i % 2 == 0 for i in range(layers))
    else:
        pattern = fields.get("gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == layers:
            sliding = tuple(bool(x) for x in pattern)
        else:
            n = int(pattern) if isinstance(pattern, int) and pattern > 0 else _GEMMA3_PATTERN
            sliding = tuple((i + 1) % n != 0 for i in range(layers))
        out["rope_local_theta"] = _GEMMA3_LOCAL_THETA
    out["sliding_window"] = int(window)
    out["sliding_layers"] = sliding
    return out


def _longrope(fields: Mapping[str, Any], read_vector: Callable[[str], list[float]]) -> dict[str, Any]:
    scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": read_vector("rope_factors_long.weight"),
                               "short_factor": read_vector("rope_factors_short.weight")}
    original = fields.get("phi3.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    factor = fields.get("phi3.rope.scaling.attn_factor")
    if factor is not None:
        scaling["attention_factor"] = float(factor)
    return scaling


def _optional_float(fields: Mapping[str, Any], key: str) -> float | None:
    value = fields.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"GGUF metadata {key} is not a number: {value!r}") from e
    if number <= 0:
        raise ModelFormatError(f"GGUF metadata {key} must be positive, got {number}")
    return number
