"""Rotary position embeddings (rotate-half layout, as in Hugging Face llama).

Scalings: linear, llama3 (from the config's numbers, or from the per-frequency divisors llama.cpp
stores in a GGUF's ``rope_freqs`` tensor) and Phi-3's longrope.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, "
                     "longrope)")


def _longrope(head_dim: int, theta: float, max_positions: int, scaling: dict[str, Any],
              config_max_positions: int) -> tuple[torch.Tensor, float]:
    """Phi-3 longrope: per-position frequencies [P, D/2] and the cos/sin magnitude.

    NOTE: Hugging Face switches the whole sequence to the long factors once it outgrows the original
    context; a paged batch cannot, so (as vLLM does) positions below the original context use the
    short factors and later ones the long factors. Both agree below the original context.
    """
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    long = torch.tensor(scaling["long_factor"], dtype=torch.float32)
    if short.numel() != head_dim // 2 or long.numel() != head_dim // 2:
        raise ValueError(f"longrope factors need {head_dim // 2} values each")
    original = int(scaling.get("original_max_position_embeddings") or config_max_positions)
    factor = config_max_positions / original
    magnitude = scaling.get("attention_factor")
    if magnitude is None:
        magnitude = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    positions = torch.arange(max_positions)
    freqs = torch.where((positions < original)[:, None], base / short, base / long)
    return freqs, float(magnitude)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None,
                 freq_factors: tuple[float, ...] | None = None) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        magnitude = 1.0
        if scaling and scaling.get("rope_type", scaling.get("type")) == "longrope":
            per_position, magnitude = _longrope(head_dim, theta, max_positions, scaling, max_positions)
            freqs = t[:, None] * per_position
        else:
            inv_freq = _inv_freq(head_dim, theta, scaling)
            if freq_factors is not None:  # GGUF rope_freqs: llama.cpp divides each frequency
                inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos() * magnitude, persistent=False)
        self.register_buffer("sin", emb.sin() * magnitude, persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions, looked up once per step and shared by every layer."""
        # positions: [T] -> cos, sin: [T, 1, D]
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, D]; k: [T, Hkv, D]; cos, sin: [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
