"""Token bitmasks: which tokens each constrained row may sample next, applied to its logits.

One int32 word holds 32 tokens: token t is allowed when bit ``t % 32`` of word ``t // 32`` is set
(llguidance's layout). Only constrained rows get a mask; the other rows of the batch are untouched,
so a free request samples exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import torch

from ferry.structured.matcher import GrammarMatcher


@dataclass(frozen=True)
class TokenMask:
    """Masks for some rows of a ``[B, V]`` logits batch."""

    rows: torch.Tensor  # [G] int64: the constrained rows of the batch
    bitmask: torch.Tensor  # [G, W] int32, W = ceil(grammar vocabulary / 32), on the CPU
    # Rows whose constraint is complete (only EOS may follow): min_tokens must not ban EOS there.
    done_rows: frozenset[int]

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[G, vocab_size] bool; ids past the grammar's vocabulary are never allowed."""
        bitmask = self.bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # [G, W * 32]
        if bits.shape[1] >= vocab_size:
            return bits[:, :vocab_size]
        pad = torch.zeros(bits.shape[0], vocab_size - bits.shape[1], dtype=torch.bool, device=device)
        return torch.cat([bits, pad], dim=1)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` [B, V] with each masked row's forbidden tokens at -inf."""
        out = logits.clone()
        rows = self.rows.to(logits.device, non_blocking=True)
        allowed = self.allowed(logits.shape[1], logits.device)
        out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
        return out


class BitmaskFiller:
    """Computes the masks of a batch's matchers in parallel, off the GIL (llguidance's executor)."""

    def __init__(self, num_threads: int | None = None) -> None:
        self._num_threads = num_threads
        self._executor: llguidance.LLExecutor | None = None

    def fill(self, matchers: Sequence[GrammarMatcher | None]) -> TokenMask | None:
        """Row i of the batch is ``matchers[i]`` (None: unconstrained). None when no row is."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        active = [m for m in matchers if m is not None]
        vocab = active[0].vocab_size
        if any(m.vocab_size != vocab for m in active):
            raise ValueError("the matchers of one batch must share one vocabulary")
        words = (vocab + 31) // 32
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._num_threads)
        # NOTE: llguidance writes row k at data_ptr + k * words * 4 and checks the sizes; the
        # tensor is contiguous and outlives the call.
        self._executor.unsafe_compute_mask_ptr(
            [(m.ll_matcher, k) for k, m in enumerate(active)], bitmask.data_ptr(), words * 4,
            len(rows))
        done = frozenset(i for i, m in zip(rows, active) if m.is_done)
        return TokenMask(torch.tensor(rows, dtype=torch.int64), bitmask, done)
