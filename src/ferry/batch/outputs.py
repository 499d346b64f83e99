"""The engine's typed contracts: the one place for the messages between scheduler, runner and core.

    Scheduler.schedule() --SchedulerOutput-->   ModelRunner.execute()
    ModelRunner.execute() --ModelRunnerOutput--> Scheduler.update()
    Scheduler.update()   --EngineCoreOutput-->  EngineCore.step() -> output processor

Everything the runner needs for a step travels in ``SchedulerOutput`` (requests, token ranges and
block tables), so the runner never calls back into the scheduler or the KV cache manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry.batch.request import Request
from ferry.outputs import Logprob


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)
    # The request's whole block table after this step's allocation: token at position p lives in
    # slot ``block_ids[p // block_size] * block_size + p % block_size`` of every layer's KV pool.
    # NOTE: a list built for this step by ``KVCacheManager.block_ids`` and owned by this message:
    # nothing else holds it, so nothing mutates it while the runner reads it.
    block_ids: list[int]
    # Speculative decoding: proposed tokens after the sequence's last one, to verify this step.
    # They are the last ``len(spec_token_ids)`` of the ``num_new_tokens``; their positions have KV
    # slots but are not part of the request until accepted (never hashed for the prefix cache).
    spec_token_ids: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_new_tokens - len(self.spec_token_ids) == self.request.num_tokens

    @property
    def num_sample_rows(self) -> int:
        """Rows sampled this step: the last one, plus one per proposed token (each verified)."""
        return 1 + len(self.spec_token_ids) if self.samples else 0


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: Logprob | None = None


@dataclass(frozen=True)
class ModelRunnerOutput:
    """The tokens each scheduled request whose chunk reached its end gains, by request id: one,
    or with speculation the accepted proposals followed by the target model's own token."""

    sampled: dict[str, list[SampledToken]]
    # draft_model speculation: the draft's proposals for each sampled request's next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
