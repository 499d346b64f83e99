"""Continuous batching under a token budget, with chunked prefill and preemption.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then
waiting ones while budget, ``max_num_seqs`` and free blocks allow. When blocks run out, the newest
running request is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed later (its prefix blocks will likely still be cached).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ferry.batch.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from ferry.batch.request import Request, RequestStatus
from ferry.config import SchedulerConfig, SpeculativeConfig
from ferry.engine.kv_cache import KVCacheManager
from ferry.outputs import Logprob
from ferry.spec import NgramProposer, max_proposals, speculates


@dataclass
class SpecDecodeCounters:
    """Speculative decoding so far: verifications with at least one proposal ("drafts"), the
    proposals verified, and those accepted, in total and by position in the proposal."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.speculative = speculative
        self.ngram = (NgramProposer(speculative.num_speculative_tokens,
                                    speculative.prompt_lookup_min, speculative.prompt_lookup_max)
                      if speculative is not None and speculative.method == "ngram" else None)
        self.spec_counters = (SpecDecodeCounters(
            accepted_per_position=[0] * speculative.num_speculative_tokens)
            if speculative is not None else None)

    # -- queue management --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> Request | None:
        """End a request from outside the step (abort, stop string): frees its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = stop_reason
        self.kv.free(request)
        return request

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- schedule ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # NOTE: victims are popped from the end of ``running``, at or after index ``i``, and the
        # admission loop below never preempts: a request already scheduled this step (index < i)
        # keeps its blocks for the whole step, so the block ids it carries stay valid.
        speculate = (self.speculative is not None
                     and self.speculative.enabled_for(len(self.running)))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            spec = self._proposals(request, num_new, budget - num_new) if speculate else []
            lookahead = self._lookahead(request, num_new, len(spec))
            while not self.kv.allocate_slots(request, num_new + len(spec) + lookahead):
                if spec or lookahead:
                    # NOTE: speculation is the first thing to give up when blocks run short,
                    # before any request is preempted for it.
                    spec, lookahead = [], 0
                    continue
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new + len(spec),
                                                  self.kv.block_ids(request.request_id),
                                                  tuple(spec)))
                budget -= num_new + len(spec)
                i += 1

        # NOTE: no admission in a step that had to preempt: the pool is already over-subscribed.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            computed = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - request.num_computed_tokens - computed.num_tokens
            # NOTE: without chunked prefill a sequence waits for a step with room for all of it,
            # unless it is longer than any step's budget (a long prompt, or prompt + output to
            # recompute after preemption): that one is chunked instead of blocking the queue forever.
            if (not self.config.enable_chunked_prefill
                    and budget < num_new <= self.config.max_num_batched_tokens):
                break
            num_new = min(num_new, budget)
            lookahead = self._lookahead(request, num_new, num_hit=computed.num_tokens)
            if not (self.kv.allocate_slots(request, num_new + lookahead, computed)
                    or (lookahead and self.kv.allocate_slots(request, num_new, computed))):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = computed.num_tokens
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens += computed.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new,
                                              self.kv.block_ids(request.request_id)))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def _proposals(self, request: Request, num_new: int, room: int) -> list[int]:
        """The proposed tokens to verify after a decode's last token (fitting ``room`` more tokens
        of the step's budget); none for prefill chunks and for requests that do not speculate."""
        if (self.speculative is None or room <= 0
                or num_new != 1 or request.num_tokens - request.num_computed_tokens != 1
                or not speculates(request)):
            return []
        cap = min(room, max_proposals(request, self.max_model_len))
        if cap <= 0:
            return []
        if self.ngram is not None:
            return self.ngram.propose(request.token_ids(0, request.num_tokens), cap)
        return request.spec_token_ids[:cap]

    def _lookahead(self, request: Request, num_new: int, num_spec: int = 0,
                   num_hit: int = 0) -> int:
        """KV slots past this step's tokens for the draft model's proposals (draft_model only):
        after the step, it feeds the sequence's new last token and its own k - 1 guesses.

        NOTE: the worst case is every proposal accepted (the new last token sits right after the
        step's tokens); slots past prompt + max_tokens can never hold a token of the sequence.
        """
        spec = self.speculative
        if spec is None or spec.method != "draft_model" or not speculates(request):
            return 0
        end = request.num_computed_tokens + num_hit + num_new
        if end < request.num_tokens:
            return 0  # a prefill chunk that does not reach the end: nothing to propose after it
        end += num_spec
        limit = min(self.max_model_len, request.num_prompt_tokens + request.max_tokens)
        return max(0, min(spec.num_speculative_tokens, limit - end))

    def _preempt(self, request: Request) -> None:
        request.spec_token_ids = []
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- update ------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        results: list[EngineCoreOutput] = []
        finished: list[Request] = []
        now = time.monotonic()
        for s in out.scheduled:
            request = s.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            sampled = runner_out.sampled.get(request.request_id)
            if sampled is None:
                request.num_computed_tokens += s.num_new_tokens
                continue  # a prefill chunk that did not reach the end yet
            num_proposed = len(s.spec_token_ids)
            num_accepted = len(sampled) - 1
            # NOTE: the KV of rejected proposals is not trusted: the sequence's computed part ends
            # at its last accepted token, and the slots after it are written again next step.
            request.num_computed_tokens += s.num_new_tokens - num_proposed + num_accepted
            if num_proposed and self.spec_counters is not None:
                self.spec_counters.record(num_proposed, num_accepted)
            if request.first_token_time is None:
                request.first_token_time = now
            new_ids: list[int] = []
            new_logprobs: list[Logprob] = []
            stopped = False
            for token in sampled:
                request.append_token(token.token_id)
                new_ids.append(token.token_id)
                if token.logprob is not None:
                    new_logprobs.append(token.logprob)
                    if request.logprobs is not None:
                        request.logprobs.append(token.logprob)
                if request.check_stop(self.max_model_len):
                    stopped = True  # an EOS, stop id or length inside an accepted run ends it
                    break
            if stopped:
                finished.append(request)
            else:
                request.spec_token_ids = runner_out.draft_token_ids.get(request.request_id, [])
            results.append(EngineCoreOutput(
                request.request_id, new_ids, new_logprobs or None,
                request.status.finish_reason, request.stop_reason,
                max(request.num_cached_tokens, 0)))
        for request in finished:
            self.running.remove(request)
            self.requests.pop(request.request_id, None)
            self.kv.free(request)
        return results
