"""Linear and embedding layers whose weight is either a dense parameter or packed GGUF blocks.

A layer starts dense (an ``nn.Linear``-shaped ``weight``); ``use_packed`` swaps in a
``PackedWeight`` built from the file's Q4_0/Q4_1/Q8_0/Q4_K blocks and drops the dense copy. The packed
path runs ``quant_linear.cpp`` on float32 CPU activations.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ferry.kernels.packing import PackedTensors


class PackedWeight(nn.Module):
    """A [out, in] weight held as packed quant blocks (buffers, so ``.to()`` and sizes see them)."""

    def __init__(self, packed: PackedTensors, ops: ModuleType) -> None:
        super().__init__()
        self.type_id = packed.type_id
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.register_buffer("codes", packed.codes)
        self.register_buffer("d", packed.d)
        self.register_buffer("m", packed.m)
        self._ops = ops

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] float32 -> [T, out]
        return self._ops.quant_linear(x, self.codes, self.d, self.m, self.type_id,
                                      self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, in] (the dequantized rows)
        return self._ops.quant_rows(ids, self.codes, self.d, self.m, self.type_id,
                                    self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, type_id={self.type_id}"


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: PackedWeight | None = None

    def use_packed(self, packed: PackedWeight) -> None:
        if (packed.out_features, packed.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"packed weight [{packed.out_features}, {packed.in_features}] does "
                             f"not fit [{self.out_features}, {self.in_features}]")
        self.packed = packed
        # the dense copy is not needed any more; an empty tensor keeps the parameter's name
        self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype,
                                               device=self.weight.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        y = self.packed.matmul(x)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(Linear):
    """Token embedding [vocab, hidden]; with tied weights it is also the output projection."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]
        if self.packed is None:
            return F.embedding(ids, self.weight)
        return self.packed.rows(ids)
