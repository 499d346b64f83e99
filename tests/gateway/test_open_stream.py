"""The gateway gives up on an upstream stream before its first token: the upstream must be closed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from ferry.gateway.backends.base import UpstreamError
from ferry.gateway.proxy import _open_stream

SSE = {"content-type": "text/event-stream"}


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("first", [b"data: not json\n\n",
                                   b'data: {"error": {"message": "boom"}}\n\n'])
async def test_a_bad_first_event_closes_the_upstream_response(first: bytes) -> None:
    body = _Body([first, b'data: {"choices": [{"index": 0, "text": "late"}]}\n\n', b"data: [DONE]\n\n"])
    resp = httpx.Response(200, stream=body, headers=SSE)
    with pytest.raises(UpstreamError):
        await _open_stream("a", resp)
    assert body.closed and resp.is_closed


async def test_a_good_stream_stays_open_for_the_client() -> None:
    body = _Body([b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n', b"data: [DONE]\n\n"])
    resp = httpx.Response(200, stream=body, headers=SSE)
    opened = await _open_stream("a", resp)
    assert not opened.done and not body.closed
    await resp.aclose()


async def test_a_body_that_is_not_an_event_stream_is_a_protocol_error() -> None:
    body = _Body([b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n'])
    resp = httpx.Response(200, stream=body, headers={"content-type": "application/json"})
    with pytest.raises(UpstreamError) as err:
        await _open_stream("a", resp)
    assert err.value.kind == "protocol" and body.closed and resp.is_closed
