"""Paged attention on CUDA (gather from the block-structured cache + SDPA) against SDPA over each
sequence's contiguous K/V, in float32 and bfloat16, with GQA, shuffled blocks and a mixed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferry.model.layers.attention import AttentionMetadata, PrefillSeq, paged_attention

BLOCK = 16
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def contiguous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """q: [Lq, H, D] at positions q_start..; k, v: [Lk, Hkv, D] (the whole context) -> [Lq, H, D]."""
    lq, lk = q.shape[0], k.shape[0]
    visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(q_start, q_start + lq, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 128), (32, 8, 64)])
def test_decodes_and_a_chunked_prefill_match_contiguous_sdpa(dtype: torch.dtype, heads: int, kv_heads: int,
                                                              head_dim: int) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    decode_lens = [1, 17, 64, 300]  # context lengths including the new token
    chunk_start, chunk_len = 40, 24  # a prefill chunk after 40 cached tokens
    num_blocks = 64
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is padding only
    seqs = [*decode_lens, chunk_start + chunk_len]
    tables, full_k, full_v = [], [], []
    for n in seqs:
        need = -(-n // BLOCK)
        tables.append([perm.pop() for _ in range(need)])
        full_k.append(torch.randn(n, kv_heads, head_dim, generator=g).to(dev, dtype))
        full_v.append(torch.randn(n, kv_heads, head_dim, generator=g).to(dev, dtype))
    # the cache already holds every token before this step's
    for table, k, v, n, new in zip(tables, full_k, full_v, seqs, [1] * len(decode_lens) + [chunk_len]):
        for p in range(n - new):
            k_cache[table[p // BLOCK], p % BLOCK] = k[p]
            v_cache[table[p // BLOCK], p % BLOCK] = v[p]
    # this step: one new token per decode, then the chunk
    q_rows = [torch.randn(1, heads, head_dim, generator=g) for _ in decode_lens]
    q_rows.append(torch.randn(chunk_len, heads, head_dim, generator=g))
    q = torch.cat(q_rows).to(dev, dtype)
    new_k = torch.cat([k[-1:] for k in full_k[:-1]] + [full_k[-1][chunk_start:]])
    new_v = torch.cat([v[-1:] for v in full_v[:-1]] + [full_v[-1][chunk_start:]])
    slots = [tables[i][(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for i, n in enumerate(decode_lens)]
    slots += [tables[-1][p // BLOCK] * BLOCK + p % BLOCK for p in range(chunk_start, chunk_start + chunk_len)]
    width = max(len(t) for t in tables[:-1])
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables[:-1]], device=dev)
    lens = torch.tensor(decode_lens, device=dev)
    ctx = chunk_start + chunk_len
    prefill = PrefillSeq(len(decode_lens), len(decode_lens) + chunk_len, chunk_start,
                         torch.tensor(tables[-1], device=dev),
                         torch.arange(ctx, device=dev)[None, :] <= torch.arange(chunk_start, ctx, device=dev)[:, None])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev), num_decodes=len(decode_lens), decode_block_table=table,
        decode_mask=(torch.arange(width * BLOCK, device=dev)[None, :] < lens[:, None])[:, None, None, :],
        prefills=(prefill,), decode_context_lens=lens, max_context_len=max(seqs))
    scale = head_dim ** -0.5
    got = paged_attention(q, new_k, new_v, k_cache, v_cache, meta, scale)
    assert got.device.type == "cuda" and got.dtype == dtype
    want = [contiguous_attention(q[i:i + 1], full_k[i], full_v[i], n - 1) for i, n in enumerate(decode_lens)]
    want.append(contiguous_attention(q[len(decode_lens):], full_k[-1], full_v[-1], chunk_start))
    torch.testing.assert_close(got, torch.cat(want), **TOL[dtype])
    # the step wrote its new tokens into their slots
    last = tables[-1][(ctx - 1) // BLOCK]
    torch.testing.assert_close(k_cache[last, (ctx - 1) % BLOCK], full_k[-1][-1], rtol=0, atol=0)
