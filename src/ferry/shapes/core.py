"""The shape every decoder-only transformer has, and the two formulas the KV cache is sized by.

``ferry.config.ArchConfig`` (what the engine runs) and ``ferry.planner.catalog.ModelSpec`` (what the
planner prices) both extend ``ModelShape``, so KV bytes per token and the KV block count are written
once, here, and the engine and the planner cannot disagree on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

# NOTE: one rule for a config that states no context length (HF ``max_position_embeddings`` /
# ``seq_length``, GGUF ``{arch}.context_length``): this value, for the engine and the planner alike.
# The planner always assumed it (multimodal ``text_config`` blocks often omit the key); the engine used
# to refuse such a model, which no test relies on, and ``--max-model-len`` still caps what it serves.
DEFAULT_CONTEXT_LENGTH = 4096

_N = TypeVar("_N", int, float)


class ShapeError(ValueError):
    """A config or metadata lacks a shape value or holds one of the wrong kind.

    The message is a predicate (``lacks integer vocab_size``): callers prefix what they read
    (``config.json``, ``GGUF file '...'``) and re-raise as their own error type.
    """


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Sizes of a decoder-only transformer with a gated MLP, in Hugging Face ``config.json`` terms."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim_override: int | None = None  # None: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _require_positive_int(name, getattr(self, name))
        if self.head_dim_override is not None:
            _require_positive_int("head_dim_override", self.head_dim_override)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        # NOTE: rounded down, as transformers does when a config states no head_dim; the engine's
        # ArchConfig refuses such a shape, the planner prices it.
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    def kv_bytes_per_token(self, dtype_bytes: _N, *, tp: int = 1, pp: int = 1) -> _N:
        """K and V for one token: 2 x layers x KV heads x head_dim x dtype bytes.

        With ``tp`` x ``pp`` GPUs it is one GPU's share: KV heads split over ``tp`` and layers over
        ``pp`` pipeline stages, each rounded up.
        """
        # NOTE: when tp exceeds the KV heads, each GPU still holds a whole (replicated) KV head.
        kv_heads = -(-self.num_key_value_heads // tp)
        layers = -(-self.num_hidden_layers // pp)
        return 2 * layers * kv_heads * self.head_dim * dtype_bytes


def kv_cache_blocks(budget_bytes: float, block_size: int, kv_bytes_per_token: float) -> int:
    """Whole KV blocks a pool of ``budget_bytes`` holds: ``budget // (block_size x KV bytes per token)``.

    The engine sizes its pool with this (``runner.memory.num_kv_blocks``) and the planner predicts that
    pool with it (``planner.memory``); for one GPU of a split replica, pass that GPU's bytes per token.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if kv_bytes_per_token <= 0:
        raise ValueError(f"kv_bytes_per_token must be positive, got {kv_bytes_per_token}")
    return int(budget_bytes // (block_size * kv_bytes_per_token))


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
