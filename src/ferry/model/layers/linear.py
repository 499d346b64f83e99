"""Linear and embedding layers whose weight is either a dense parameter or packed GGUF blocks.

A layer starts dense (an ``nn.Linear``-shaped ``weight``); ``use_packed`` swaps in one or more
``PackedWeight`` row ranges built from the file's quantized blocks and drops the dense copy. A fused
projection whose parts have different types (q/k in Q4_K, v in Q6_K) keeps one part per type. The
packed path runs ``quant_linear.cpp`` on float32 CPU activations.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        # steps of at least this many rows multiply in bfloat16 (AMX; ``matmul_dtype``) over the
        # weight dequantized for the call, or over ``bf16_weight`` when kept; None: always the
        # float32 kernel
        self.bf16_rows: int | None = None
        self.bf16_weight: torch.Tensor | None
        self.register_buffer("bf16_weight", None)

    def keep_bf16(self) -> None:
        """Keep the weight dequantized as [in, out] bfloat16 beside its blocks (2 bytes a weight),
        so bfloat16 steps skip the per-call dequantization (what makes them pay from ~16 rows)."""
        self.bf16_weight = self._ops.dequantize_t_bf16(
            self.codes, self.d, self.m, self.type_id, self.out_features, self.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] float32 -> [T, out]
        if self.bf16_rows is not None and x.shape[0] >= self.bf16_rows:
            wt = self.bf16_weight
            if wt is None:
                wt = self._ops.dequantize_t_bf16(self.codes, self.d, self.m, self.type_id,
                                                 self.out_features, self.in_features)
            return torch.mm(x.to(torch.bfloat16), wt).float()
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
        self.packed: nn.ModuleList | None = None  # PackedWeight parts, in output-row order

    def use_packed(self, parts: Sequence[PackedWeight]) -> None:
        rows = sum(p.out_features for p in parts)
        if not parts or rows != self.out_features or any(
                p.in_features != self.in_features for p in parts):
            shapes = ", ".join(f"[{p.out_features}, {p.in_features}]" for p in parts)
            raise ValueError(f"packed weights {shapes or '(none)'} do not fit "
                             f"[{self.out_features}, {self.in_features}]")
        self.packed = nn.ModuleList(parts)
        # the dense copy is not needed any more; an empty tensor keeps the parameter's name
        self.weight = nn.Parameter(torch.empty(0, self.in_features, dtype=self.weight.dtype,
                                               device=self.weight.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if len(self.packed) == 1:
            y = self.packed[0].matmul(x)
        else:
            y = torch.cat([part.matmul(x) for part in self.packed], dim=-1)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(Linear):
    """Token embedding [vocab, hidden]; with tied weights it is also the output projection."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]
        if self.packed is None:
            return F.embedding(ids, self.weight)
        if len(self.packed) != 1:
            raise RuntimeError("an embedding is packed from one tensor")
        return self.packed[0].rows(ids)
