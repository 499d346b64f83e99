"""Fused RMSNorm, residual add, rotary and SiLU-mul kernels against the PyTorch layers they replace,
on each build (``kernels``: native, AVX2, portable)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from ferry.model.layers.norm import RMSNorm
from ferry.model.layers.rotary import RotaryEmbedding, apply_rotary


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("t,n", [(1, 576), (7, 40), (33, 1000)])
def test_rms_norm_and_residual_add(kernels: ModuleType, t: int, n: int) -> None:
    norm = RMSNorm(n, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(n, generator=gen(1)) + 0.5)
    x = torch.randn(t, n, generator=gen(2)) * 3
    y = torch.randn(t, n, generator=gen(3))
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.eps), norm(x),
                                   rtol=2e-6, atol=1e-6)
        total, normed = kernels.add_rms_norm(x, y, norm.weight, norm.eps)
        assert torch.equal(total, x + y)
        torch.testing.assert_close(normed, norm(x + y), rtol=2e-6, atol=1e-6)
        wide = torch.randn(t, n + 8, generator=gen(4))[:, :n]  # rows with a stride, as from a slice
        torch.testing.assert_close(kernels.rms_norm(wide, norm.weight, norm.eps), norm(wide),
                                   rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 6)])
def test_rotary_in_place_equals_the_reference_bit_for_bit(kernels: ModuleType, heads: int,
                                                          kv_heads: int, head_dim: int) -> None:
    t = 11
    rope = RotaryEmbedding(head_dim, 4096, 10000.0)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 4095, 3, 3, 64, 1000])
    cos, sin = rope(positions, torch.float32)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen(5))
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.clone().split([q_size, kv_size, kv_size], dim=-1)
    want_q, want_k = apply_rotary(q.reshape(t, heads, head_dim), k.reshape(t, kv_heads, head_dim),
                                  cos, sin)
    kernels.rotary_qkv_(qkv, cos.squeeze(1), sin.squeeze(1), heads, kv_heads, head_dim)
    assert torch.equal(qkv[:, :q_size], want_q.reshape(t, q_size))
    assert torch.equal(qkv[:, q_size:q_size + kv_size], want_k.reshape(t, kv_size))
    assert torch.equal(qkv[:, q_size + kv_size:], v)  # v is left alone


def test_silu_mul(kernels: ModuleType) -> None:
    gate_up = torch.randn(5, 2 * 1537, generator=gen(6)) * 4
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.0, -89.0, 1e-30, -1e-30])
    gate, up = gate_up.split(1537, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    assert kernels.silu_mul(torch.empty(0, 8)).shape == (0, 4)


def test_silu_mul_keeps_its_relative_error_over_the_whole_range_of_exp(kernels: ModuleType) -> None:
    # SiLU(g) = g / (1 + exp(-g)): for g down to -88.7, exp(-g) reaches 2^128 (the largest power
    # of two the vector exp scales by), and the result keeps exp's relative error there
    gate = torch.linspace(-88.7, 30.0, 4000)
    gate_up = torch.cat([gate, torch.ones(4000)]).reshape(1, -1)
    want = F.silu(gate.double()).float().reshape(1, -1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), want, rtol=1e-6, atol=0.0)


def test_bad_shapes_raise(kernels: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="weight"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.silu_mul(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="q, k and v"):
        kernels.rotary_qkv_(torch.randn(2, 10), torch.ones(2, 4), torch.ones(2, 4), 1, 1, 4)
    with pytest.raises(RuntimeError, match="same shape"):
        kernels.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5)
