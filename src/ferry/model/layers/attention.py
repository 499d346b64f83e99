"""Paged attention over a block-structured KV cache.

Per layer and per step, the new tokens' K/V are first written into their cache slots for the
whole batch, then attention reads. So a request may read blocks another request of the same step
is writing (prefix hits registered at scheduling time) — the write always lands first.

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (same for v_cache)
    slot = block_id * block_size + offset_in_block

Decodes (one query token each) run in one call: ferry's C++ kernel reading K/V in place (float32 on
CPU, when the model has its ``kernels``), else one padded batch gathered from the cache for
PyTorch's SDPA. Prefill chunks run one sequence at a time (from the fresh K/V when the chunk starts
at position 0, else gathered from the cache).

Two variants change which scores count: a sliding window (a query at position p sees keys in
(p - window, p]) and logit soft-capping (Gemma 2: scores -> cap * tanh(scores / cap) before the
mask). Layers with either run on PyTorch ops, with their masks built here from the block table and
context lengths; block-table entries behind the window may name freed blocks, which stay masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSeq:
    start: int  # first row of this chunk in the flat token batch
    end: int
    num_computed: int  # tokens already in the cache before this chunk (its first position)
    block_ids: torch.Tensor | None  # [num_blocks] long, None when num_computed == 0
    mask: torch.Tensor | None  # [L, ctx] bool, True = attend; None when num_computed == 0


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] long
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_block_table: torch.Tensor | None  # [B, max_blocks] long (padded with block 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool (SDPA path)
    prefills: tuple[PrefillSeq, ...]
    decode_context_lens: torch.Tensor | None = None  # [B] long (kernel path)
    # the longest context of the step (tokens before and in it); a sliding window shorter than
    # this bites somewhere, else it is plain causal attention; None: unknown (the window applies)
    max_context_len: int | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache: [N, bs, Hkv, D]; k: [T, Hkv, D]; slot_mapping: [T]
    n, bs, hkv, d = k_cache.shape
    k_cache.view(n * bs, hkv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(n * bs, hkv, d).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    kernels: ModuleType | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    # q: [T, H, D]; k, v: [T, Hkv, D] -> out: [T, H, D]
    if window is not None and meta.max_context_len is not None and meta.max_context_len <= window:
        window = None  # every context fits the window: plain causal attention (the kernel path)
    if window is not None or softcap is not None:
        return _variant_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode_attention(q[:meta.num_decodes], k_cache, v_cache, meta,
                                                   scale, kernels)
    for seq in meta.prefills:
        out[seq.start:seq.end] = _prefill_attention(q[seq.start:seq.end], k[seq.start:seq.end],
                                                    v[seq.start:seq.end], k_cache, v_cache, seq,
                                                    scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float,
                      kernels: ModuleType | None) -> torch.Tensor:
    # q: [B, H, D] -> [B, H, D]
    assert meta.decode_block_table is not None
    if kernels is not None:
        assert meta.decode_context_lens is not None
        return kernels.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_table,
                                              meta.decode_context_lens, scale)
    assert meta.decode_mask is not None
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    table = meta.decode_block_table
    keys = k_cache[table].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[table].flatten(1, 2).transpose(1, 2)
    # NOTE: the query heads that share a KV head ride along the "query length" axis, so GQA needs
    # no repeat of K/V: [B, Hkv, group, D] against [B, Hkv, L, D].
    qg = q.view(b, hkv, h // hkv, d)
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(b, h, d)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    # q: [L, H, D]; k, v: [L, Hkv, D] -> [L, H, D]
    gqa = q.shape[1] != k.shape[1]
    if seq.block_ids is None:
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(0, 1)
    assert seq.mask is not None
    ctx = seq.mask.shape[1]
    keys = k_cache[seq.block_ids].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hkv, ctx, D]
    values = v_cache[seq.block_ids].flatten(0, 1)[:ctx].transpose(0, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=seq.mask,
                                       scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)


def _variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                       window: int | None, softcap: float | None) -> torch.Tensor:
    """Sliding-window and/or soft-capped attention, decodes batched and prefills one by one."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    b = meta.num_decodes
    if b:
        assert meta.decode_block_table is not None and meta.decode_context_lens is not None
        table, lens = meta.decode_block_table, meta.decode_context_lens
        keys = k_cache[table].flatten(1, 2)  # [B, L, Hkv, D]
        values = v_cache[table].flatten(1, 2)
        key_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
        visible = key_pos < lens[:, None]  # [B, L]
        if window is not None:
            visible &= key_pos > lens[:, None] - 1 - window
        out[:b] = _masked_attention(q[:b, None], keys, values, visible[:, None, :], scale, softcap)[:, 0]
    for seq in meta.prefills:
        n = seq.end - seq.start
        if seq.block_ids is None:
            keys, values = k[seq.start:seq.end], v[seq.start:seq.end]
        else:
            ctx = seq.num_computed + n
            keys = k_cache[seq.block_ids].flatten(0, 1)[:ctx]
            values = v_cache[seq.block_ids].flatten(0, 1)[:ctx]
        q_pos = torch.arange(seq.num_computed, seq.num_computed + n, device=q.device)[:, None]
        key_pos = torch.arange(keys.shape[0], device=q.device)[None, :]
        visible = key_pos <= q_pos  # [n, ctx]
        if window is not None:
            visible &= key_pos > q_pos - window
        out[seq.start:seq.end] = _masked_attention(q[None, seq.start:seq.end], keys[None], values[None],
                                                   visible[None], scale, softcap)[0]
    return out


def _masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                      scale: float, softcap: float | None) -> torch.Tensor:
    # q: [B, Lq, H, D]; keys, values: [B, Lk, Hkv, D]; visible: [B, Lq, Lk] bool -> [B, Lq, H, D]
    bsz, lq, h, d = q.shape
    hkv = keys.shape[2]
    group = h // hkv
    # NOTE: the query heads that share a KV head ride along the query axis: [B, Hkv, group*Lq, D].
    qg = q.view(bsz, lq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(bsz, hkv, group * lq, d)
    kt = keys.permute(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    vt = values.permute(0, 2, 1, 3)
    mask = visible[:, None, None].expand(bsz, 1, group, lq, visible.shape[-1]).reshape(
        bsz, 1, group * lq, visible.shape[-1])
    if softcap is None:
        o = F.scaled_dot_product_attention(qg, kt, vt, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qg.float(), kt.float().transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), vt.float()).to(q.dtype)
    return o.reshape(bsz, hkv, group, lq, d).permute(0, 3, 1, 2, 4).reshape(bsz, lq, h, d)
