"""GGUF metadata + tensor table -> model shape: the one reader the loader and the planner share.

``metadata`` maps GGUF keys to plain values (arrays as lists, as gguf-py's ``contents()`` gives them);
``tensors`` maps GGUF tensor names to numpy-order shapes (``token_embd.weight``: ``(vocab, hidden)``).
Nothing here opens a file, so neither gguf-py nor numpy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ferry.shapes.core import DEFAULT_CONTEXT_LENGTH, ModelShape, ShapeError

S = TypeVar("S", bound=ModelShape)


def gguf_value(metadata: Mapping[str, Any], key: str, default: Any = None, kind: type = int) -> Any:
    """``{general.architecture}.{key}`` as ``kind``; ``default`` None makes the key required.

    A per-layer list (llama.cpp writes some keys per layer) must repeat one value.
    """
    name = f"{metadata.get('general.architecture')}.{key}"
    value = metadata.get(name, default)
    if value is None:
        raise ShapeError(f"lacks {name}")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ShapeError(f"has {name} varying per layer ({value}); not supported")
        value = value[0]
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"has an invalid {name} value {value!r}") from e


def shape_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]], cls: type[S],
                    **extra: Any) -> S:
    """``cls`` (``ModelShape`` or a subclass, whose other fields ``extra`` fills) from GGUF metadata.

    - ``{arch}.vocab_size``, else the rows of ``token_embd.weight``;
    - ``{arch}.attention.head_count_kv`` defaults to the heads; ``{arch}.attention.key_length`` is kept
      only where it differs from ``embedding_length // head_count``;
    - context length: ``{arch}.context_length``, else ``DEFAULT_CONTEXT_LENGTH`` (the same rule as for
      a Hugging Face config, for the engine and the planner alike);
    - embeddings are tied when there is no ``output.weight``; q/k/v carry a bias when
      ``blk.0.attn_q.bias`` exists.

    Raises ``ShapeError`` for a missing or malformed value; ``cls`` checks the rest.
    """
    embd = tensors.get("token_embd.weight")
    vocab = gguf_value(metadata, "vocab_size", embd[0] if embd else None)
    hidden = gguf_value(metadata, "embedding_length")
    heads = gguf_value(metadata, "attention.head_count")
    head_dim = gguf_value(metadata, "attention.key_length", hidden // max(heads, 1))
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=gguf_value(metadata, "feed_forward_length"),
        num_hidden_layers=gguf_value(metadata, "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=gguf_value(metadata, "attention.head_count_kv", heads),
        max_position_embeddings=gguf_value(metadata, "context_length", DEFAULT_CONTEXT_LENGTH),
        head_dim_override=head_dim if heads * head_dim != hidden else None,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        **extra,
    )


def rope_from_gguf(metadata: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from ``{arch}.rope.*``; ``rope_scaling`` as Hugging Face writes it."""
    arch = metadata.get("general.architecture")
    theta = gguf_value(metadata, "rope.freq_base", 10000.0, kind=float)
    scaling: dict[str, Any] | None = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling = {"rope_type": str(scaling_type), "factor": gguf_value(metadata, "rope.scaling.factor", kind=float)}
        if f"{arch}.rope.scaling.original_context_length" in metadata:
            scaling["original_max_position_embeddings"] = gguf_value(metadata, "rope.scaling.original_context_length")
    elif f"{arch}.rope.scale_linear" in metadata:
        scaling = {"rope_type": "linear", "factor": gguf_value(metadata, "rope.scale_linear", kind=float)}
    return theta, scaling
