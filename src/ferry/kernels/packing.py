"""GGUF block-quantized weights kept quantized: raw rows, and the tile layout the kernel reads.

``QuantizedTensor`` is what the GGUF loader yields instead of a float32 tensor when asked to keep
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights as they are: the file's raw blocks, one row per output feature,
already in Hugging Face row order. ``pack`` turns it into the tile layout of ``quant_linear.cpp``.

Q4_K runs on the Q4_1 kernel and Q5_K on the Q5_1 one: each 32-weight sub-block's scale (d * sc)
and minimum (dmin * m) are computed in float32 exactly as gguf-py computes them, and d * q - dm
equals d * q + (-dm). Five-bit codes keep their low 4 bits as nibbles, like Q4, and their fifth
bits in a separate bit plane (one 16-bit mask of the tile's rows per k).
Q6_K keeps its codes (q - 32, as int8) and gets one float32 scale (d * sc) per 16 weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

BLOCK = 32  # weights per kernel block along K (one scale, one minimum)
TILE = 16  # output rows per packed tile

_Q = GGMLQuantizationType
# the kernel type each file type runs on (0: Q4_0, 1: Q4_1, 2: Q8_0, 3: int8 codes with a scale
# per 16 weights, 4: Q5_0, 5: Q5_1), and the file's block: (weights, bytes)
KERNEL_TYPES: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    _Q.Q4_0: (0, 32, 18),  # fp16 d, 16 bytes of nibbles
    _Q.Q4_1: (1, 32, 20),  # fp16 d, fp16 m, 16 bytes of nibbles
    _Q.Q5_0: (4, 32, 22),  # fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles
    _Q.Q5_1: (5, 32, 24),  # fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles
    _Q.Q8_0: (2, 32, 34),  # fp16 d, 32 int8
    _Q.Q4_K: (1, 256, 144),  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
    _Q.Q5_K: (5, 256, 176),  # as Q4_K, with 32 bytes of fifth bits before the nibbles
    _Q.Q6_K: (3, 256, 210),  # 128 bytes low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 d
}
BYTE_CODE_TYPES = (2, 3)  # kernel types with one int8 code a byte
FIVE_BIT_TYPES = (4, 5)  # kernel types with 5-bit codes: nibbles plus a bit plane
# (the others: two 4-bit codes a byte)


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D GGUF weight [out, in] as raw blocks: ``blocks`` is uint8 [out, in / 32 * block bytes]."""

    qtype: GGMLQuantizationType
    shape: tuple[int, int]
    blocks: np.ndarray

    def __post_init__(self) -> None:
        if self.qtype not in KERNEL_TYPES:
            raise ValueError(f"no kernel for {self.qtype.name}")
        n, k = self.shape
        _, weights, block_bytes = KERNEL_TYPES[self.qtype]
        if k % weights:
            raise ValueError(f"in_features {k} is not a multiple of {weights}")
        if self.blocks.dtype != np.uint8 or self.blocks.shape != (n, k // weights * block_bytes):
            raise ValueError(f"blocks of shape {self.blocks.shape} do not hold a {self.qtype.name} "
                             f"tensor of shape {self.shape}")

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], exactly as gguf-py dequantizes the file's tensor."""
        return torch.from_numpy(np.ascontiguousarray(
            dequantize(self.blocks, self.qtype).reshape(self.shape), dtype=np.float32))

    def take_rows(self, order: np.ndarray) -> QuantizedTensor:
        """The same tensor with its rows reordered (``order[i]`` is the old row of new row i)."""
        return QuantizedTensor(self.qtype, self.shape, np.ascontiguousarray(self.blocks[order]))


def concat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Row-wise concatenation (fused q/k/v or gate/up) of tensors of one type and width."""
    first = parts[0]
    if any(p.qtype != first.qtype or p.shape[1] != first.shape[1] for p in parts):
        raise ValueError("cannot fuse tensors of different quant types or widths")
    n = sum(p.shape[0] for p in parts)
    return QuantizedTensor(first.qtype, (n, first.shape[1]),
                           np.concatenate([p.blocks for p in parts], axis=0))


@dataclass(frozen=True)
class PackedTensors:
    """The kernel's inputs (see quant_linear.cpp): codes, per-block scales d and minimums m."""

    type_id: int
    out_features: int
    in_features: int
    # uint8 [tiles, K/2, 16] (4-bit codes), [tiles, K, 16] (int8 codes) or [tiles, K/32, 320]
    # (5-bit codes: per 32-wide block, 256 bytes of nibbles then 32 16-bit masks of fifth bits)
    codes: torch.Tensor
    d: torch.Tensor  # float32 [tiles, K/32, 16] ([tiles, K/16, 16] for Q6_K)
    m: torch.Tensor  # float32 [tiles, K/32, 16] for Q4_1/Q5_1 (and Q4_K/Q5_K), else empty


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32"""
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., B] bytes -> [..., 2B] codes: the low nibbles are codes 0..B-1, the high ones B..2B-1."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes (a little-endian uint32, bit i for weight i) -> [..., 32] codes' bit 4."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


def _unpack(q: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [N, K] (uint8; Q8_0/Q6_K: int8 bit patterns), d and m [N, K/32] float32 (m None if
    unused)."""
    n, k = q.shape
    _, weights, block_bytes = KERNEL_TYPES[q.qtype]
    b = q.blocks.reshape(n, k // weights, block_bytes)
    if q.qtype == _Q.Q8_0:
        return b[..., 2:].reshape(n, k), _f16(b[..., 0:2]), None
    if q.qtype in (_Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1):
        with_min = q.qtype in (_Q.Q4_1, _Q.Q5_1)
        offset = 4 if with_min else 2
        m = _f16(b[..., 2:4]) if with_min else None
        if q.qtype in (_Q.Q5_0, _Q.Q5_1):
            codes = _nibbles(b[..., offset + 4:offset + 20]) | _fifth_bits(b[..., offset:offset + 4])
        else:
            codes = _nibbles(b[..., offset:offset + 16])
        return codes.reshape(n, k), _f16(b[..., 0:2]), m
    nb = k // weights
    if q.qtype == _Q.Q6_K:
        return _unpack_q6_k(b.reshape(n * nb, block_bytes), n, k)
    # Q4_K, Q5_K: 8 sub-blocks of 32 per 256; 32-byte groups of nibbles hold sub-blocks 2g (low)
    # and 2g+1 (high); Q5_K's 32 bytes of fifth bits: bit s of byte i belongs to weight i of
    # sub-block s
    sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(n * nb, 12))
    d = _f16(b[..., 0:2]).reshape(n * nb, 1) * sc.astype(np.float32)
    dm = _f16(b[..., 2:4]).reshape(n * nb, 1) * mn.astype(np.float32)
    if q.qtype == _Q.Q5_K:
        shifts = np.arange(8, dtype=np.uint8).reshape(8, 1)
        fifth = ((b[..., None, 16:48] >> shifts) & np.uint8(1)) << np.uint8(4)  # [n, nb, 8, 32]
        codes = _nibbles(b[..., 48:].reshape(n, nb, 4, 32)).reshape(n, nb, 8, 32) | fifth
    else:
        codes = _nibbles(b[..., 16:].reshape(n, nb, 4, 32))
    return codes.reshape(n, k), d.reshape(n, k // BLOCK), -dm.reshape(n, k // BLOCK)


def _unpack_q6_k(b: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """Q6_K blocks [n * k / 256, 210] -> int8 codes [n, k] (as uint8), scales [n, k / 16]."""
    ql = (b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32)
          >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = (ql.reshape(-1, 8, 32) | (qh.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    d = _f16(b[:, 208:210].reshape(-1, 1, 2)) * b[:, 192:208].view(np.int8).astype(np.float32)
    return codes.view(np.uint8).reshape(n, k), d.reshape(n, k // 16), None


def pack(q: QuantizedTensor) -> PackedTensors:
    n, k = q.shape
    type_id = KERNEL_TYPES[q.qtype][0]
    codes, d, m = _unpack(q)
    tiles = -(-n // TILE)
    rows = tiles * TILE

    def pad(a: np.ndarray) -> np.ndarray:  # padding rows: d = 0, so their weights are 0
        out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
        out[:n] = a
        return out

    codes = pad(codes)

    def tiled(a: np.ndarray) -> np.ndarray:  # [rows, X] -> [tiles, X, 16]
        return np.ascontiguousarray(a.reshape(tiles, TILE, -1).swapaxes(1, 2))

    if type_id in BYTE_CODE_TYPES:
        packed_codes = tiled(codes)
    else:  # two 4-bit codes a byte: k = 2p low, 2p + 1 high nibble
        packed_codes = tiled((codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4))
    if type_id in FIVE_BIT_TYPES:
        # per 32-wide block: its 256 bytes of nibbles, then per k the 16 rows' fifth bits as a
        # little-endian uint16 (bit j: row j), so one 32-bit load covers a pair of k
        fifth = np.packbits(tiled(codes >> 4), axis=-1, bitorder="little")  # [tiles, K, 2]
        packed_codes = np.concatenate([packed_codes.reshape(tiles, k // BLOCK, -1),
                                       fifth.reshape(tiles, k // BLOCK, -1)], axis=-1)

    return PackedTensors(
        type_id=type_id, out_features=n, in_features=k,
        codes=torch.from_numpy(packed_codes), d=torch.from_numpy(tiled(pad(d))),
        m=torch.from_numpy(tiled(pad(m))) if m is not None else torch.empty(0))
