"""N-gram prompt lookup (vLLM's ``ngram`` method): no model, only the sequence's own tokens.

For n from ``max_n`` down to ``min_n``: find the latest earlier occurrence of the last n tokens in
prompt + output, and propose the (up to) k tokens that followed it; nothing when no n matches.

    tokens:  ... a b c d e ... x y a b c | (the last 3 tokens)
                     ^^^^^ ^^^            proposal: d e (what followed "a b c" before)

Cost per call: one NumPy comparison of the last n tokens against every window of the sequence,
O(n x L) in C for each n tried; the Python side is a handful of calls whatever L is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, "
                             f"{max_n}")
        if num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        self.k = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to ``min(k, max_tokens)`` tokens to follow ``token_ids`` (prompt + output)."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        length = len(token_ids)
        if k <= 0 or length < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # windows starting at 0 .. L-n-1: every occurrence that ends before the last token,
            # so the suffix itself is never its own match and a match has a token after it
            windows = sliding_window_view(tokens[:length - 1], n)  # [L - n, n]
            hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest occurrence: the most local context
                return tokens[start:start + k].tolist()
        return []
