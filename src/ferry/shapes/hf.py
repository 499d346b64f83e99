"""Hugging Face ``config.json`` -> model shape: the one reader the loader and the planner share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ferry.shapes.core import DEFAULT_CONTEXT_LENGTH, ModelShape, ShapeError

S = TypeVar("S", bound=ModelShape)

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_CONTEXT_KEYS = ("max_position_embeddings", "seq_length")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part: a multimodal config's ``text_config``, else the config itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def model_type(config: Mapping[str, Any]) -> str:
    return str(text_config(config).get("model_type", config.get("model_type", "")))


def architecture(config: Mapping[str, Any]) -> str:
    """``architectures[0]``; ``""`` when the config names none."""
    archs = config.get("architectures")
    return str(archs[0]) if archs else ""


def shape_from_hf_config(config: Mapping[str, Any], cls: type[S], **extra: Any) -> S:
    """``cls`` (``ModelShape`` or a subclass, whose other fields ``extra`` fills) from a config dict.

    - sizes come from ``text_config`` when there is one; ``num_key_value_heads`` defaults to the heads;
    - ``head_dim`` is kept only where it differs from ``hidden_size // num_attention_heads``;
    - context length: ``max_position_embeddings``, else ``seq_length``, else ``DEFAULT_CONTEXT_LENGTH``
      (a missing or null key; the same rule as for GGUF, for the engine and the planner alike);
    - ``tie_word_embeddings`` defaults to False (True for Gemma); ``attention_bias`` is always True for
      Qwen2, else the config's ``attention_bias`` (default False).

    Raises ``ShapeError`` when a required size is missing or not an integer; ``cls`` checks the rest.
    """
    cfg = text_config(config)
    missing = [k for k in _REQUIRED if not isinstance(cfg.get(k), int)]
    if missing:
        raise ShapeError(f"lacks integer {', '.join(missing)}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim")
    context = next((cfg[k] for k in _CONTEXT_KEYS if cfg.get(k) is not None), DEFAULT_CONTEXT_LENGTH)
    kind = model_type(config)
    # NOTE: Qwen2's config has no attention_bias key; its q/k/v always carry a bias.
    qwen2 = kind.startswith("qwen2") or architecture(config).startswith("Qwen2")
    return cls(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        max_position_embeddings=context,
        head_dim_override=head_dim if head_dim and head_dim * heads != hidden else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings",
                                         config.get("tie_word_embeddings", kind.startswith("gemma")))),
        attention_bias=qwen2 or bool(cfg.get("attention_bias", False)),
        **extra,
    )


def rope_from_hf_config(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the old keys or transformers 5's ``rope_parameters``.

    ``rope_scaling`` is an HF-style dict keyed by ``rope_type`` (e.g. ``{"rope_type": "llama3",
    "factor": 8.0, ...}``), or None for plain rope.
    """
    cfg = text_config(config)
    params = dict(cfg.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), Mapping):  # per layer type (Gemma 3): the global one
        params = dict(params["full_attention"])
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = cfg.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = dict(scaling)
        scaling.pop("rope_theta", None)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return theta, scaling


def local_rope_theta(config: Mapping[str, Any]) -> float | None:
    """The rope base of sliding-window layers where it differs from the global one (Gemma 3's
    ``rope_local_base_freq``, or transformers 5's ``rope_parameters.sliding_attention``)."""
    cfg = text_config(config)
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("sliding_attention"), Mapping):
        theta = params["sliding_attention"].get("rope_theta")
        return float(theta) if theta is not None else None
    theta = cfg.get("rope_local_base_freq")
    return float(theta) if theta is not None else None
