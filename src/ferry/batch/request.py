"""One sequence's state inside the engine.

Progress is ``num_computed_tokens`` against ``num_tokens`` (prompt + generated): prefill, chunked
prefill, prefix-cache hits and recompute after preemption are all the same thing — computing the
tokens from ``num_computed_tokens`` up to ``num_tokens``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ferry.outputs import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Logprob
from ferry.sampling_params import SamplingParams
from ferry.structured import GrammarMatcher


def child_request_id(parent_id: str, index: int) -> str:
    """The id of the ``index``-th sequence a request fans out into (one per choice of ``n``, one per
    prompt of a batched completion): ``{parent}#{index}``, nested as ``{parent}#{p}#{c}``.

    NOTE: the one convention for every child id, so a log line or an abort names a sequence the
    same way wherever it was split.
    """
    return f"{parent_id}#{index}"


def parent_request_id(child_id: str) -> str:
    """The request a ``child_request_id`` was split from (the last ``#`` level)."""
    return child_id.rsplit("#", 1)[0]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: FINISH_STOP,
                   RequestStatus.FINISHED_LENGTH: FINISH_LENGTH,
                   RequestStatus.FINISHED_ABORTED: FINISH_ABORT}


@dataclass(eq=False)
class Request:
    """A single sequence. A user request with ``n > 1`` becomes ``n`` of these sharing a prompt."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16  # resolved: params.max_tokens, or what is left of the context
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_cached_tokens: int = -1  # prefix-cache hit tokens at first scheduling; -1 until scheduled
    num_preemptions: int = 0
    logprobs: list[Logprob] | None = None
    generator: torch.Generator | None = None  # seeded per request, on the sampling device
    # Chained hashes of this request's full blocks, filled lazily by the KV cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Constrained decoding: this sequence's place in its grammar, advanced by ``append_token``.
    # NOTE: preemption keeps ``output_token_ids`` (only the KV is recomputed), so the matcher stays
    # in step with them; each of the ``n`` sequences of a request has its own.
    grammar: GrammarMatcher | None = None
    # Speculative decoding: tokens proposed to follow ``output_token_ids``, verified at the next
    # step (not part of the sequence: they never count in ``num_tokens`` nor in block hashes).
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sampling_params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After a token was appended: set a finished status if it ends the sequence."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.grammar is not None and self.grammar.is_done and last in self.eos_token_ids:
            # NOTE: EOS is only allowed once the constraint is complete, and then it is the only
            # token allowed: the grammar's end ends the sequence, over min_tokens and ignore_eos.
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
