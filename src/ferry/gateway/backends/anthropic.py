"""Anthropic's Messages API behind the gateway's OpenAI face.

The backend's HTTP client goes through ``MessagesTransport``, which turns each chat completion
request into ``POST {url}/messages`` and the answer back into an OpenAI chat completion, or an
OpenAI chunk stream ending in a usage chunk and ``[DONE]``, so routing, failover, the ledger and the
metrics see an upstream like any other. Keys travel in ``x-api-key`` with ``anthropic-version``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from ferry.gateway.anthropic import TranslationError
from ferry.gateway.anthropic.errors import openai_error_from_anthropic
from ferry.gateway.anthropic.from_messages import ChunkTranslator, chat_completion
from ferry.gateway.anthropic.to_messages import messages_request
from ferry.gateway.backends.base import Backend
from ferry.sse import SSE_DONE, SSEError, aiter_sse_data, sse_event

# NOTE: Anthropic answers 529 when it is overloaded; OpenAI's clients and the gateway's failover
# know 503 for that
_STATUS = {529: 503}


def _openai_error(status: int, message: str, kind: str = "invalid_request_error") -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": kind, "param": None,
                                                  "code": None}})


class _ChunkStream(httpx.AsyncByteStream):
    """The upstream's Messages events as OpenAI chunk events, closed with the upstream response."""

    def __init__(self, upstream: httpx.Response) -> None:
        self.upstream = upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        translator = ChunkTranslator()
        try:
            async for payload in aiter_sse_data(self.upstream):
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    event = None
                if not isinstance(event, dict):
                    yield sse_event({"error": {"message": f"bad Messages event: {payload[:100]!r}",
                                               "type": "upstream_error"}}).encode()
                    return
                for chunk in translator.feed(event):
                    yield sse_event(chunk).encode()
                if translator.done:
                    yield SSE_DONE.encode()
                    return
        except SSEError as e:
            raise httpx.DecodingError(f"not an event stream: {e}") from e

    async def aclose(self) -> None:
        await self.upstream.aclose()


class MessagesTransport(httpx.AsyncBaseTransport):
    """Chat completions in OpenAI's shape over Anthropic's Messages API; other GETs pass through."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path.endswith("/chat/completions"):
            return await self._chat(request, path[: -len("chat/completions")] + "messages")
        if request.method == "POST":
            endpoint = path.rsplit("/", 1)[-1]
            return _openai_error(400, f"an anthropic backend serves chat completions, not {endpoint}")
        return await self.inner.handle_async_request(request)

    async def _chat(self, request: httpx.Request, messages_path: str) -> httpx.Response:
        try:
            body = json.loads(request.content)
            translated = messages_request(body)
        except (TranslationError, json.JSONDecodeError) as e:
            return _openai_error(400, str(e))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "content-type")}
        upstream_request = httpx.Request("POST", request.url.copy_with(path=messages_path), headers=headers,
                                         json=translated, extensions=request.extensions)
        upstream = await self.inner.handle_async_request(upstream_request)
        if upstream.status_code != 200:
            try:
                raw = await upstream.aread()
            finally:
                await upstream.aclose()
            try:
                error: Any = json.loads(raw)
            except json.JSONDecodeError:
                error = raw.decode(errors="replace")
            status = _STATUS.get(upstream.status_code, upstream.status_code)
            return httpx.Response(status, json=openai_error_from_anthropic(upstream.status_code, error))
        if translated.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=_ChunkStream(upstream))
        try:
            raw = await upstream.aread()
        finally:
            await upstream.aclose()
        try:
            return httpx.Response(200, json=chat_completion(json.loads(raw)))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise httpx.DecodingError(f"not a Messages response: {raw[:100]!r}") from e

    async def aclose(self) -> None:
        await self.inner.aclose()


class AnthropicBackend(Backend):
    def auth_headers(self, env: Mapping[str, str]) -> dict[str, str]:
        c = self.config
        headers = {"anthropic-version": c.version or ""}
        if c.api_key_env:
            headers["x-api-key"] = env.get(c.api_key_env, "")
        return headers

    def wrap_transport(self, transport: httpx.AsyncBaseTransport | None, limits: httpx.Limits
                       ) -> httpx.AsyncBaseTransport:
        return MessagesTransport(transport or httpx.AsyncHTTPTransport(limits=limits))
