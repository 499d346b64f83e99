"""Decode attention read in place from the paged KV cache, against a float64 reference, on each
build (``kernels``: native, AVX2, portable)."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch


def make_case(heads: int, kv_heads: int, head_dim: int, lens: list[int], block_size: int = 4,
              num_blocks: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 2
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    width = max(-(-n // block_size) for n in lens)
    # each sequence gets distinct blocks in a shuffled order; padding entries point at block 0
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    table = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        need = -(-n // block_size)
        table[i, :need] = perm[used:used + need]
        used += need
    return q, k, v, table, torch.tensor(lens, dtype=torch.long)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
              lens: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[2]
    for i, n in enumerate(lens.tolist()):
        keys = k[table[i]].flatten(0, 1)[:n].double()  # [n, Hkv, D]
        values = v[table[i]].flatten(0, 1)[:n].double()
        for h in range(q.shape[1]):
            s = keys[:, h // group] @ q[i, h].double() * scale
            out[i, h] = torch.softmax(s, 0) @ values[:, h // group]
    return out.float()


# head_dim 24: a vector tail on AVX2, the scalar loops on AVX-512; 12: scalar loops on both
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 24),
                                                     (2, 1, 12)])
@pytest.mark.parametrize("lens", [[1], [5, 1, 17, 4], [33, 64, 2]])
def test_matches_reference(kernels: ModuleType, heads: int, kv_heads: int, head_dim: int,
                           lens: list[int]) -> None:
    q, k, v, table, ctx = make_case(heads, kv_heads, head_dim, lens)
    scale = 1 / math.sqrt(head_dim)
    got = kernels.paged_decode_attention(q, k, v, table, ctx, scale)
    torch.testing.assert_close(got, reference(q, k, v, table, ctx, scale), rtol=1e-5, atol=1e-5)


def test_large_scores(kernels: ModuleType) -> None:
    # scores in the hundreds: the softmax must subtract the max before exp
    q, k, v, table, ctx = make_case(6, 2, 64, [40, 7, 129], block_size=16, num_blocks=32, seed=3)
    q = q * 30
    want = reference(q, k, v, table, ctx, 0.125)
    got = kernels.paged_decode_attention(q, k, v, table, ctx, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_metadata_raises_instead_of_reading_out_of_bounds(ops: ModuleType) -> None:
    q, k, v, table, ctx = make_case(4, 2, 32, [5, 3])
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.paged_decode_attention(q, k, v, table, torch.tensor([9, 3]), 1.0)
    bad = table.clone()
    bad[0, 0] = 64
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode_attention(q, k, v, bad, ctx, 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        ops.paged_decode_attention(q[:, :3], k, v, table, ctx, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.paged_decode_attention(q.double(), k, v, table, ctx, 1.0)
