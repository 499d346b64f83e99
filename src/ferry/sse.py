"""Server-sent events, both ways: one module that frames what ferry streams, reads what an upstream
streams, and closes a streaming response however it ends. The server, the gateway and the bench
client all use it; it imports nothing from ferry (a leaf).

Closing matters: when a client goes away, Starlette cancels the response; ``SSEResponse`` then
``aclose()``s the body iterator at once (so generators inside it abort their engine requests or
close their upstream streams) and runs ``on_close`` (which also covers a body that never started,
whose ``finally`` would never run), instead of leaving both to the garbage collector.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
from httpx_sse import EventSource, SSEError
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "SSE_DONE", "SSEError", "SSEResponse", "aiter_sse_data", "parse_sse", "sse_event"]

DONE = "[DONE]"  # OpenAI's end-of-stream payload
SSE_DONE = f"data: {DONE}\n\n"


def sse_event(payload: BaseModel | Mapping[str, Any] | str, *,
              exclude: set[str] | None = None) -> str:
    """One SSE ``data:`` event. A ``str`` is an already-serialized payload (passed through as it is).

    Serialized JSON has no raw newlines, so it is one ``data:`` line; a passed-through payload with
    newlines gets one ``data:`` line per line, which a reader joins back with newlines.
    """
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    elif isinstance(payload, str):
        body = payload
    else:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if "\n" in body or "\r" in body:
        lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "".join(f"data: {line}\n" for line in lines) + "\n"
    return f"data: {body}\n\n"


async def aiter_sse_data(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The ``data`` payloads of a streamed ``text/event-stream`` response, in order.

    Decoded as the SSE standard says: an event ends at a blank line (an unterminated last event is
    dropped) and the ``data:`` lines of one event join with a newline. Comments, event names, ids
    and blank keep-alive events are skipped. Raises ``SSEError`` when the response is not an event
    stream; network errors are httpx's own.
    """
    events = EventSource(response).aiter_sse()
    try:
        async for event in events:
            if event.data:
                yield event.data
    finally:
        await events.aclose()


def parse_sse(text: str) -> list[str]:
    """The ``data`` payloads of a whole SSE body, in order (tests and tools), by the same decoder."""
    response = httpx.Response(200, content=text.encode(),
                              headers={"content-type": "text/event-stream"})
    return [event.data for event in EventSource(response).iter_sse() if event.data]


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response whose body iterator is closed, and ``on_close`` awaited,
    however the response ends: finished, failed, or cancelled because the client left."""

    def __init__(self, content: AsyncIterator[str] | AsyncIterator[bytes], *,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, status_code=200, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **(headers or {})})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: shielded so that a cancelled response (client gone) still frees what it holds.
            with anyio.CancelScope(shield=True):
                await self._close()

    def transformed(self, transform: Callable[[AsyncIterator[str] | AsyncIterator[bytes]], AsyncIterator[str]],
                    headers: Mapping[str, str] | None = None) -> SSEResponse:
        """A response whose events are ``transform`` of this one's (another API's event shapes);
        ending it, however it ends, closes this one's content and runs its ``on_close``."""
        return SSEResponse(transform(self._content), on_close=self._close, headers=headers)

    async def _close(self) -> None:
        try:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if self._on_close is not None:
                await self._on_close()
