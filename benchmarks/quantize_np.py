"""numpy quantizers for the GGUF K-quants gguf-py can only dequantize: Q4_K and Q6_K.

They write valid blocks in llama.cpp's layout (gguf-py's ``dequantize`` reads them back), with a
plain min/max choice of each sub-block's scale, not llama.cpp's iterative search
(``make_qkx2_quants``): the bytes per weight, and so the decode speed, are those of the real
types; the rounding error is somewhat larger than llama.cpp's. ``quantize`` also covers the types
gguf-py quantizes itself (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...).

    blocks = quantize(weights_f32_2d, GGMLQuantizationType.Q4_K)  # uint8 [rows, cols/256*144]
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n] float -> [n, 2] uint8 (float16, little-endian)"""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> Q4_K blocks uint8 [rows, cols / 256 * 144].

    A block: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and minimums, 128 bytes of
    nibbles; weight = d * sc[s] * q - dmin * m[s] for sub-block s (32 weights), q in 0..15.
    """
    rows, cols = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [blocks, sub-block, 32]
    lo = np.minimum(x.min(axis=-1), 0.0)  # llama.cpp keeps the minimum <= 0
    hi = x.max(axis=-1)
    scale = (hi - lo) / 15.0  # [blocks, 8]
    minimum = -lo  # >= 0, subtracted
    d = scale.max(axis=-1) / 63.0  # [blocks]
    dmin = minimum.max(axis=-1) / 63.0
    d16 = d.astype(np.float16).astype(np.float32)
    dmin16 = dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d16[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(minimum, dmin16[:, None])), 0, 63).astype(np.uint8)
    step = d16[:, None] * sc  # [blocks, 8]
    offset = dmin16[:, None] * mn
    q = np.clip(np.rint(_safe_div(x + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)

    # 6-bit scales/minimums: bytes 0-3 sc[0:4] (+ top bits of sc[4:8]), 4-7 mn[0:4] (+ top bits of
    # mn[4:8]), 8-11 low nibbles of sc[4:8] | low nibbles of mn[4:8] << 4
    packed = np.empty((len(x), 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # 4 groups of 32 bytes: sub-block 2g in the low nibbles, 2g + 1 in the high ones
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(len(x), 128)
    blocks = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), packed, qs], axis=-1)
    return blocks.reshape(rows, cols // QK_K * 144)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> Q6_K blocks uint8 [rows, cols / 256 * 210].

    A block: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16 d;
    weight = d * sc[s] * (q - 32) for sub-block s (16 weights), q in 0..63.
    """
    rows, cols = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)  # [blocks, sub-block, 16]
    scale = np.abs(x).max(axis=-1) / 31.0  # [blocks, 16]
    d16 = (scale.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d16[:, None])), 0, 127).astype(np.int8)
    step = d16[:, None] * sc.astype(np.float32)
    q = (np.clip(np.rint(_safe_div(x, step[..., None])), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(len(x), 256)

    # weight w = 128 h + 64 s + i: low nibble in byte 64 h + i (s = 0 low, s = 1 high nibble);
    # w = 128 h + 32 t + i: high 2 bits in byte 32 h + i at bits 2t
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    blocks = np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d16)], axis=-1)
    return blocks.reshape(rows, cols // QK_K * 210)


def quantize(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 [rows, cols] -> raw blocks uint8 [rows, bytes per row] of ``qtype``."""
    if qtype == GGMLQuantizationType.Q4_K:
        return quantize_q4_k(w)
    if qtype == GGMLQuantizationType.Q6_K:
        return quantize_q6_k(w)
    return gguf_quants.quantize(w.astype(np.float32), qtype)
