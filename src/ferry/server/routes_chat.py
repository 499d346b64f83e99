"""``/v1/chat/completions``: chat messages -> the chat template -> one generation, blocking or SSE."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from jinja2 import TemplateError

from ferry.openai_errors import bad_request
from ferry.openapi_bodies import request_body
from ferry.outputs import RequestOutput
from ferry.server.checks import check_prompt, sampling_params
from ferry.server.deltas import DeltaTracker
from ferry.server.deps import Engine, State, json_body
from ferry.server.driver import fill_log, run_blocking, stream_response
from ferry.server.generation import Generation
from ferry.server.protocol import ChatCompletionRequest
from ferry.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    TokenTexts,
    chat_logprobs,
    now_s,
    random_id,
    usage_of,
)
from ferry.sse import sse_event

router = APIRouter()

_body = json_body(ChatCompletionRequest)


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(
        request: Request, req: Annotated[ChatCompletionRequest, Depends(_body.parse)], state: State,
        engine: Engine, model_name: Annotated[str, Depends(_body.model_name)]) -> Response:
    params = sampling_params(req, engine.tokenizer.vocab_size, state.generation_defaults)
    try:
        ids = engine.tokenizer.encode_chat(req.template_messages(), add_generation_prompt=True)
    except (ValueError, TemplateError) as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc
    check_prompt(ids, params, engine.max_model_len, engine.tokenizer.vocab_size, "messages")
    request_id = random_id("chatcmpl")
    gen = Generation(state, engine, request_id, [ids], params)
    texts = TokenTexts(engine.tokenizer)
    top_k = req.top_logprobs or 0
    created = now_s()

    if not req.stream:
        result = await run_blocking(request, gen)
        if isinstance(result, Response):
            return result
        choices = [ChatChoice(
            index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            logprobs=(chat_logprobs(texts, c.logprobs or [], top_k) if req.logprobs else None))
            for c in result[0].outputs]
        body = ChatCompletionResponse(id=request_id, created=created, model=model_name,
                                      choices=choices, usage=usage_of(result))
        return Response(body.model_dump_json(), media_type="application/json")

    tracker = DeltaTracker(params.n)
    usage_exclude = None if req.include_usage else {"usage"}

    def chunk(choice: ChatChunkChoice) -> str:
        return sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                             choices=[choice]), exclude=usage_exclude)

    def on_output(prompt: int, out: RequestOutput) -> Iterator[str]:
        for d in tracker.update(prompt, out):
            if d.first:
                yield chunk(ChatChunkChoice(index=d.index,
                                            delta=DeltaMessage(role="assistant", content="")))
            if d.send:
                yield chunk(ChatChunkChoice(
                    index=d.index, delta=DeltaMessage(content=d.text), finish_reason=d.finish_reason,
                    logprobs=chat_logprobs(texts, d.logprobs, top_k) if req.logprobs else None))

    def on_end(finals: list[RequestOutput]) -> Iterator[str]:
        if not finals:
            return
        if req.include_usage:
            yield sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                                choices=[], usage=usage_of(finals)))
        fill_log(request, finals, gen)

    return await stream_response(request, gen, on_output, on_end)
