"""Which requests speculate, and how many proposed tokens one step may verify for a request.

Verification samples every proposed position in one batch, each row with its own context: the
min_tokens ban, repetition/frequency/presence penalties and logprobs are computed per row from
the output so far plus the proposals before it, so they stay exact. What cannot be verified in a
batch is state that only advances one accepted token at a time:

- structured outputs (``grammar``): the matcher's mask for a later position depends on the
  proposals before it being accepted; such requests run without speculation.
"""

from __future__ import annotations

from ferry.batch.request import Request


def speculates(request: Request) -> bool:
    """True when proposals may be verified for this request (see the module's note)."""
    return request.grammar is None


def max_proposals(request: Request, max_model_len: int) -> int:
    """How many proposals can still matter: every step adds the accepted ones plus one token of
    the target's, and none may go past ``max_tokens`` or the context."""
    left_output = request.max_tokens - request.num_output_tokens
    left_context = max_model_len - request.num_tokens
    return max(0, min(left_output, left_context) - 1)
