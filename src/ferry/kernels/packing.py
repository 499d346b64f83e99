"""GGUF block-quantized weights kept quantized: raw rows, and the tile layout the kernel reads.

``QuantizedTensor`` is what the GGUF loader yields instead of a float32 tensor when asked to keep
Q4_0/Q4_1/Q8_0 weights as they are: the file's raw blocks, one row per output feature, already
in Hugging Face row order. ``pack`` turns it into the tile layout of ``quant_linear.cpp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

BLOCK = 32  # weights per block along K
TILE = 16  # output rows per packed tile

# kernel type id and bytes per 32-weight block: fp16 d [, fp16 m], then the codes
KERNEL_TYPES: dict[GGMLQuantizationType, tuple[int, int]] = {
    GGMLQuantizationType.Q4_0: (0, 18),
    GGMLQuantizationType.Q4_1: (1, 20),
    GGMLQuantizationType.Q8_0: (2, 34),
}


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
        if k % BLOCK:
            raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
        if self.blocks.dtype != np.uint8 or self.blocks.shape != (n, k // BLOCK * self.block_bytes):
            raise ValueError(f"blocks of shape {self.blocks.shape} do not hold a {self.qtype.name} "
                             f"tensor of shape {self.shape}")

    @property
    def block_bytes(self) -> int:
        return KERNEL_TYPES[self.qtype][1]

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
    codes: torch.Tensor  # uint8 [tiles, K/2, 16] (Q4) or [tiles, K, 16] (Q8_0)
    d: torch.Tensor  # float32 [tiles, K/32, 16]
    m: torch.Tensor  # float32 [tiles, K/32, 16] for Q4_1, else empty


def pack(q: QuantizedTensor) -> PackedTensors:
    n, k = q.shape
    type_id, block_bytes = KERNEL_TYPES[q.qtype]
    nb = k // BLOCK
    tiles = -(-n // TILE)
    padded = np.zeros((tiles * TILE, nb, block_bytes), dtype=np.uint8)
    padded[:n] = q.blocks.reshape(n, nb, block_bytes)  # padding rows: d = 0, so weights are 0
    d = padded[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]  # [rows, nb]
    m = np.zeros((0,), dtype=np.float32)
    if q.qtype == GGMLQuantizationType.Q8_0:
        codes = padded[..., 2:].reshape(tiles, TILE, k)  # int8 bit patterns
    else:
        offset = 4 if q.qtype == GGMLQuantizationType.Q4_1 else 2
        if q.qtype == GGMLQuantizationType.Q4_1:
            m = padded[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
        qs = padded[..., offset:offset + BLOCK // 2]  # [rows, nb, 16]
        # a block's low nibbles are its weights 0..15, the high nibbles 16..31
        q4 = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(tiles * TILE, k)
        codes = (q4[:, 0::2] | (q4[:, 1::2] << 4)).reshape(tiles, TILE, k // 2)

    def tiled(a: np.ndarray) -> torch.Tensor:  # [tiles, 16, X] -> [tiles, X, 16]
        return torch.from_numpy(np.ascontiguousarray(a.swapaxes(1, 2)))

    return PackedTensors(
        type_id=type_id, out_features=n, in_features=k,
        codes=tiled(codes),
        d=tiled(d.reshape(tiles, TILE, nb)),
        m=tiled(m.reshape(tiles, TILE, nb)) if m.size else torch.empty(0))
