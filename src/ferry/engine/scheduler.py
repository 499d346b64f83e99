"""Continuous batching under a token budget, with chunked prefill and preemption.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then
waiting ones while budget, ``max_num_seqs`` and free blocks allow. When blocks run out, the newest
running request is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed later (its prefix blocks will likely still be cached).
"""

from __future__ import annotations

import time
from collections import deque

from ferry.batch.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from ferry.batch.request import Request, RequestStatus
from ferry.config import SchedulerConfig
from ferry.engine.kv_cache import KVCacheManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

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
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new,
                                                  self.kv.block_ids(request.request_id)))
                budget -= num_new
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
            if not self.kv.allocate_slots(request, num_new, computed):
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

    def _preempt(self, request: Request) -> None:
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
            request.num_computed_tokens += s.num_new_tokens
            sampled = runner_out.sampled.get(request.request_id)
            if sampled is None:
                continue  # a prefill chunk that did not reach the end yet
            request.append_token(sampled.token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            if request.logprobs is not None and sampled.logprob is not None:
                request.logprobs.append(sampled.logprob)
            if request.check_stop(self.max_model_len):
                finished.append(request)
            results.append(EngineCoreOutput(
                request.request_id, [sampled.token_id],
                [sampled.logprob] if sampled.logprob is not None else None,
                request.status.finish_reason, request.stop_reason,
                max(request.num_cached_tokens, 0)))
        for request in finished:
            self.running.remove(request)
            self.requests.pop(request.request_id, None)
            self.kv.free(request)
        return results
