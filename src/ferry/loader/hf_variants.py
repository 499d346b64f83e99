"""What sets each architecture apart, read from a Hugging Face ``config.json``: the ``ArchConfig``
variant fields (q/k norms, Gemma's sandwich norms, GeGLU, scales and soft-caps, sliding windows).

The sizes come from ``ferry.shapes.hf`` (shared with the planner); this module only adds the flags
of the one decoder (``ferry.model.llama``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ferry.loader.base import ModelFormatError
from ferry.shapes import hf

# Hugging Face ``model_type`` -> the architecture name ferry registers it under
MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# multimodal checkpoints whose language model ferry serves (text only) -> that model's architecture
TEXT_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
SUPPORTED = frozenset(MODEL_TYPES.values())
GEMMA = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
# architectures whose configs carry a ``sliding_window`` that is only used with ``use_sliding_window``
_OPT_IN_WINDOW = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def variant_fields(architecture: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``ArchConfig`` keyword arguments beyond the shape, rope and token ids."""
    cfg = hf.text_config(config)
    out: dict[str, Any] = {}
    if architecture in _OPT_IN_WINDOW and cfg.get("use_sliding_window"):
        raise ModelFormatError(f"{architecture} with use_sliding_window=true is not supported")
    if architecture == "Qwen3ForCausalLM":
        out["qk_norm"] = True
    if architecture in GEMMA:
        out.update(_gemma(architecture, cfg))
    elif architecture not in _OPT_IN_WINDOW and cfg.get("sliding_window") is not None:
        out["sliding_window"] = _positive_int(cfg, "sliding_window")  # Mistral, Phi-3: every layer
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        act = "gelu_pytorch_tanh"
    elif act != "silu":
        raise ModelFormatError(f"activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    out["hidden_act"] = act
    if architecture == "Phi3ForCausalLM":
        params = cfg.get("rope_parameters") or {}
        partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ModelFormatError(f"partial_rotary_factor={partial} is not supported")
    return out


def _gemma(architecture: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    layers = cfg.get("num_hidden_layers")
    assert isinstance(layers, int)  # checked by the shape reader before
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        sliding = tuple(t == "sliding_attention" for t in types)
    elif architecture == "Gemma2ForCausalLM":  # older configs: even layers slide
        sliding = tuple(i % 2 == 0 for i in range(layers))
    else:  # older Gemma 3 configs: every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        sliding = tuple((i + 1) % pattern != 0 for i in range(layers))
    out: dict[str, Any] = {
        "sandwich_norm": True,
        "embedding_scale": math.sqrt(cfg["hidden_size"]),
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 0) or None,
        "attn_logit_softcapping": _optional_float(cfg, "attn_logit_softcapping"),
        "final_logit_softcapping": _optional_float(cfg, "final_logit_softcapping"),
        "qk_norm": architecture == "Gemma3ForCausalLM",
    }
    if cfg.get("sliding_window") is not None and any(sliding):
        out["sliding_window"] = _positive_int(cfg, "sliding_window")
        out["sliding_layers"] = sliding
        if architecture == "Gemma3ForCausalLM":
            out["rope_local_theta"] = hf.local_rope_theta(cfg) or 10000.0
    return out


def _optional_float(cfg: Mapping[str, Any], key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(f"{key} must be a positive integer, got {value!r}")
    return value
