"""``/v1/completions``: one or more prompts (text or token ids), ``n`` choices each, blocking or SSE."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from ferry.engine.async_engine import AsyncEngine
from ferry.openapi_bodies import request_body
from ferry.outputs import Logprob, RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server.checks import check_prompt, sampling_params
from ferry.server.deltas import DeltaTracker
from ferry.server.deps import Engine, State, json_body
from ferry.server.driver import fill_log, run_blocking, stream_response
from ferry.server.generation import Generation
from ferry.server.protocol import CompletionRequest
from ferry.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenTexts,
    completion_logprobs,
    completion_logprobs_end,
    now_s,
    random_id,
    usage_of,
)
from ferry.sse import sse_event

router = APIRouter()

_body = json_body(CompletionRequest)


@dataclass
class _PromptInfo:
    ids: list[int]
    text: str


def _completion_prompts(req: CompletionRequest, engine: AsyncEngine,
                        params: SamplingParams) -> list[_PromptInfo]:
    tok = engine.tokenizer
    out = []
    for i, p in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
            text = p
        else:
            ids = list(p)
            text = tok.decode(ids, skip_special_tokens=False) if req.echo else ""
        check_prompt(ids, params, engine.max_model_len, tok.vocab_size, param)
        out.append(_PromptInfo(ids, text))
    return out


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(
        request: Request, req: Annotated[CompletionRequest, Depends(_body.parse)], state: State,
        engine: Engine, model_name: Annotated[str, Depends(_body.model_name)]) -> Response:
    params = sampling_params(req, engine.tokenizer.vocab_size, state.generation_defaults)
    prompts = _completion_prompts(req, engine, params)
    request_id = random_id("cmpl")
    gen = Generation(state, engine, request_id, [p.ids for p in prompts], params)
    texts = TokenTexts(engine.tokenizer)
    top_k = req.logprobs or 0
    n = params.n
    created = now_s()

    def echo_prefix(i: int) -> str:
        return prompts[i].text if req.echo else ""

    def logprobs_for(i: int, logprobs: list[Logprob], first_chunk: bool,
                     offset: int) -> CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        prompt_ids = prompts[i].ids if (req.echo and first_chunk) else ()
        return completion_logprobs(texts, logprobs, top_k, offset, prompt_ids)

    if not req.stream:
        result = await run_blocking(request, gen)
        if isinstance(result, Response):
            return result
        choices = []
        for i, out in enumerate(result):
            for c in out.outputs:
                choices.append(CompletionChoice(
                    index=i * n + c.index, text=echo_prefix(i) + c.text, finish_reason=c.finish_reason,
                    logprobs=logprobs_for(i, c.logprobs or [], True, 0)))
        body = CompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                  usage=usage_of(result))
        return Response(body.model_dump_json(), media_type="application/json")

    tracker = DeltaTracker(n, always_send_first=req.echo)
    text_offsets: dict[int, int] = {}  # choice index -> where its next logprobs token starts
    usage_exclude = None if req.include_usage else {"usage"}

    def on_output(prompt: int, out: RequestOutput) -> Iterator[str]:
        for d in tracker.update(prompt, out):
            if not d.send:
                continue
            text = (echo_prefix(prompt) if d.first else "") + d.text
            lp = logprobs_for(prompt, d.logprobs, d.first, text_offsets.get(d.index, 0))
            if lp is not None:
                text_offsets[d.index] = completion_logprobs_end(lp, text_offsets.get(d.index, 0))
            yield sse_event(CompletionResponse(
                id=request_id, created=created, model=model_name,
                choices=[CompletionChoice(index=d.index, text=text, logprobs=lp,
                                          finish_reason=d.finish_reason)]),
                exclude=usage_exclude)

    def on_end(finals: list[RequestOutput]) -> Iterator[str]:
        if req.include_usage:
            yield sse_event(CompletionResponse(id=request_id, created=created, model=model_name,
                                               choices=[], usage=usage_of(finals)))
        fill_log(request, finals, gen)

    return await stream_response(request, gen, on_output, on_end)
