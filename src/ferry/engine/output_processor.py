"""Engine-core outputs -> user-facing ``RequestOutput``: detokenization, stop strings, ``n`` choices.

A user request with ``n`` choices runs as ``n`` engine sequences named ``{request_id}#{i}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry.batch.outputs import EngineCoreOutput
from ferry.batch.request import Request
from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.outputs import FINISH_STOP, CompletionOutput, RequestMetrics, RequestOutput
from ferry.tokenizer import Tokenizer


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    def snapshot(self) -> RequestOutput:
        finished = self.finished
        outs = [CompletionOutput(o.index, d.emittable_text(o.finish_reason is not None),
                                 list(o.token_ids), o.finish_reason, o.stop_reason,
                                 list(o.logprobs) if o.logprobs is not None else None)
                for o, d in zip(self.outputs, self.detokenizers)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, finished,
                             self.num_cached_tokens, self.metrics)


@dataclass(frozen=True)
class StopStringHit:
    child_id: str
    stop: str


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}
        self._child_to_parent: dict[str, tuple[RequestState, int]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def request_ids(self) -> list[str]:
        """The requests not finished yet (a copy: safe to abort them while iterating)."""
        return list(self._states)

    def add(self, state: RequestState) -> None:
        self._states[state.request_id] = state
        for i, child in enumerate(state.children):
            self._child_to_parent[child.request_id] = (state, i)

    def remove(self, request_id: str) -> RequestState | None:
        state = self._states.pop(request_id, None)
        if state is not None:
            for child in state.children:
                self._child_to_parent.pop(child.request_id, None)
        return state

    def process(self, core_outputs: list[EngineCoreOutput]
                ) -> tuple[list[RequestOutput], list[StopStringHit]]:
        touched: dict[str, RequestState] = {}
        hits: list[StopStringHit] = []
        now = time.monotonic()
        for out in core_outputs:
            entry = self._child_to_parent.get(out.request_id)
            if entry is None:
                continue  # aborted meanwhile
            state, index = entry
            completion = state.outputs[index]
            if completion.finish_reason is not None:
                continue
            request = state.children[index]
            text_ids = self._text_token_ids(request, out)
            detokenizer = state.detokenizers[index]
            stop = detokenizer.update(text_ids) if text_ids else None
            new_ids, new_logprobs = out.new_token_ids, out.new_logprobs
            if stop is not None:
                # NOTE: a stop string completed inside a run of accepted speculative tokens ends
                # the output at the token that completed it, as one-token steps would have.
                new_ids = new_ids[:detokenizer.num_consumed]
                new_logprobs = new_logprobs[:detokenizer.num_consumed] if new_logprobs else None
            completion.token_ids.extend(new_ids)
            if completion.logprobs is not None and new_logprobs:
                completion.logprobs.extend(new_logprobs)
            state.num_cached_tokens = out.num_cached_tokens if index == 0 else state.num_cached_tokens
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = request.first_scheduled_time
            state.metrics.last_token_time = now
            if stop is not None:
                completion.finish_reason, completion.stop_reason = FINISH_STOP, stop
                if out.finish_reason is None:
                    hits.append(StopStringHit(out.request_id, stop))
            elif out.finish_reason is not None:
                completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                self.remove(state.request_id)
            results.append(state.snapshot())
        return results, hits

    @staticmethod
    def _text_token_ids(request: Request, out: EngineCoreOutput) -> list[int]:
        """Tokens to detokenize: an EOS or stop token id that ended the sequence shows no text."""
        if out.finish_reason == FINISH_STOP and not isinstance(out.stop_reason, str):
            if not request.sampling_params.include_stop_str_in_output:
                return out.new_token_ids[:-1]
        return out.new_token_ids
