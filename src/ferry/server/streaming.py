"""Server-sent events: framing, merging several engine streams, and a response that always closes.

Closing matters: when a client goes away, Starlette cancels the response; ``SSEResponse`` then
``aclose()``s the body iterator at once so the engine generators inside it abort their requests and
free their KV blocks, instead of waiting for the garbage collector.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> str:
    """One SSE ``data:`` event. JSON has no raw newlines, so one ``data:`` line is enough."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {body}\n\n"


def parse_sse(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (for tests and tools)."""
    out = []
    for event in text.split("\n\n"):
        lines = [ln[len("data:"):].lstrip() for ln in event.split("\n") if ln.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose async body iterator is closed however the response ends."""

    def __init__(self, content: AsyncIterator[str], *,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, status_code=200, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **(headers or {})})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: shielded so that a cancelled response (client gone) still frees its requests.
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        try:
            await _aclose(self._content)
        finally:
            if self._on_close is not None:
                await self._on_close()


_END = object()


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as ``(stream index, item)``, in arrival order.

    The first exception of any stream is re-raised. Closing the merged iterator (or cancelling its
    consumer) cancels every producer task, which closes each source iterator.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await _aclose(streams[0])
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))
            return
        finally:
            await _aclose(stream)
        await queue.put((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                logger.debug("stream producer ended with %r after the merge closed", r)
