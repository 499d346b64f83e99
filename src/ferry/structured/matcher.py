"""One sequence's place in its grammar: advanced with every token the sequence takes."""

from __future__ import annotations

import logging

import llguidance

logger = logging.getLogger(__name__)


class GrammarMatcher:
    """Wraps an ``LLMatcher``; only the engine thread touches it once the sequence is added.

    ``num_tokens`` counts the tokens taken, so the engine can check that the matcher follows the
    sequence's output tokens (preemption keeps them; anything that rewound them would ``replay``).
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.ll_matcher = matcher
        self.vocab_size = vocab_size
        self.num_tokens = 0

    def accept(self, token_id: int) -> bool:
        """Take the sequence's next token; False (and an error state) if the grammar forbids it.

        NOTE: the sampler only draws allowed tokens, so False means a bug or a token that did not
        come from the sampler; the matcher then allows only EOS, which ends the sequence.
        """
        self.num_tokens += 1
        ok = self.ll_matcher.consume_token(token_id)
        if not ok:
            logger.error("token %d is not allowed by the grammar: %s", token_id, self.error)
        return ok

    def replay(self, token_ids: list[int]) -> bool:
        """Start over and take ``token_ids`` (a sequence whose output was rewound)."""
        self.ll_matcher.reset()
        self.num_tokens = 0
        return all(self.accept(t) for t in token_ids)

    @property
    def is_done(self) -> bool:
        """The constraint is complete and nothing may follow: only EOS is allowed next (also
        after an error)."""
        return self.ll_matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match (more may still follow, or EOS)."""
        return self.ll_matcher.is_accepting()

    @property
    def is_error(self) -> bool:
        return self.ll_matcher.is_error()

    @property
    def error(self) -> str:
        return self.ll_matcher.get_error().split("\n", 1)[0]
