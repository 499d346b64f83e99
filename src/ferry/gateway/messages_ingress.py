"""``POST /v1/messages``: Anthropic's Messages API in front of the gateway, as LiteLLM offers it.

A Messages request is translated to a chat request and goes through the same stages and routing
as ``/v1/chat/completions`` (keys, data classes, limits, on-prem first, failover, the ledger), then
the answer is translated back: a Message, or the Messages stream's events. Tools written for
Anthropic's SDKs thus reach on-prem models. Errors leave in Anthropic's shape, with the same status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ferry.gateway.anthropic import TranslationError
from ferry.gateway.anthropic.chat_request import chat_request
from ferry.gateway.anthropic.errors import anthropic_error, anthropic_error_from_openai
from ferry.gateway.anthropic.message_response import EventTranslator, anthropic_message, sse
from ferry.gateway.ledger import CLIENT_CLOSED
from ferry.gateway.proxy import InferenceHandler
from ferry.disconnect import replay_body
from ferry.openai_errors import OpenAIError, parse_json_object
from ferry.sse import DONE, SSEResponse, parse_sse


def _ferry_headers(response: Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ferry-")}


def _events(translator: EventTranslator):  # noqa: ANN202  # NOTE: a transform for SSEResponse.transformed
    async def transform(chunks: AsyncIterator[str] | AsyncIterator[bytes]) -> AsyncIterator[str]:
        async for item in chunks:
            for payload in parse_sse(item.decode() if isinstance(item, bytes) else item):
                if payload == DONE:
                    for event in translator.finish():
                        yield sse(event)
                    return
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                if isinstance(chunk, dict):
                    for event in translator.feed(chunk):
                        yield sse(event)
    return transform


class MessagesIngress:
    def __init__(self, handler: InferenceHandler) -> None:
        self.handler = handler

    async def __call__(self, request: Request) -> Response:
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        try:
            body = parse_json_object(raw, request.headers.get("content-type"))
            chat = chat_request(body)
        except OpenAIError as e:
            return JSONResponse(anthropic_error(e.status_code, e.message), status_code=e.status_code)
        except TranslationError as e:
            return JSONResponse(anthropic_error(400, str(e)), status_code=400)
        # NOTE: the translated body once, then the client's own messages (its disconnect)
        inner = Request(request.scope, replay_body(json.dumps(chat).encode(), request.receive))
        response = await self.handler(inner, "chat/completions")
        model, stops = str(body["model"]), list(chat.get("stop") or [])
        if isinstance(response, SSEResponse):
            return response.transformed(_events(EventTranslator(model, stops)), headers=_ferry_headers(response))
        if response.status_code == CLIENT_CLOSED:
            return response
        try:
            answer: Any = json.loads(bytes(response.body))
        except json.JSONDecodeError:
            answer = bytes(response.body).decode(errors="replace")
        if response.status_code != 200:
            return JSONResponse(anthropic_error_from_openai(response.status_code, answer),
                                status_code=response.status_code, headers={
                                    **_ferry_headers(response),
                                    **{k: v for k, v in response.headers.items() if k == "retry-after"}})
        return JSONResponse(anthropic_message(answer, model, stops), headers=_ferry_headers(response))
