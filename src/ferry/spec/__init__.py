"""Speculative decoding: proposers of the tokens a sequence will likely generate next.

    ngram.py   prompt lookup (vLLM's ``ngram``): the tokens that followed the latest earlier
               occurrence of the sequence's last n tokens
    draft.py   a draft model (``draft_model``): its own weights and KV tensors, indexed by the
               target's block ids, run by the model runner
    policy.py  which requests speculate, and how many proposals a step may verify

Verification lives in the runner (every proposed position is sampled in the same forward as the
rest of the batch) and acceptance in the scheduler's update. Layer: below ``runner`` (which runs
the draft), above ``batch`` (requests) and ``model | loader`` (the draft's weights).
"""

from ferry.spec.draft import DraftModel
from ferry.spec.ngram import NgramProposer
from ferry.spec.policy import max_proposals, speculates

__all__ = ["DraftModel", "NgramProposer", "max_proposals", "speculates"]
