"""ferry.sse: the one SSE module's framing and reading, round-tripped through the same decoder."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from ferry.sse import SSE_DONE, SSEError, aiter_sse_data, parse_sse, sse_event


class _Chunk(BaseModel):
    id: str
    usage: int | None = None


def test_frames_models_dicts_and_passed_through_payloads() -> None:
    assert sse_event({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'
    assert sse_event(_Chunk(id="x", usage=3), exclude={"usage"}) == 'data: {"id":"x"}\n\n'
    assert sse_event('{"raw": 1}') == 'data: {"raw": 1}\n\n'
    # NOTE: a passed-through payload with newlines must not end the event early
    assert sse_event("line1\nline2") == "data: line1\ndata: line2\n\n"


def test_parse_round_trips_and_skips_comments_and_keepalives() -> None:
    body = (sse_event({"a": "x\ny"}) + ": keep-alive comment\n\n" + "event: ping\ndata:\n\n"
            + sse_event("p\nq") + SSE_DONE)
    assert parse_sse(body) == ['{"a":"x\\ny"}', "p\nq", "[DONE]"]
    assert parse_sse("data:no-space\r\n\r\ndata: two\n\n") == ["no-space", "two"]


async def test_aiter_sse_data_reads_a_streamed_response_in_order() -> None:
    chunks = [b"data: {\"n\": 1}\n", b"\n: comment\n\ndata: [DO", b"NE]\n\n"]

    async def body():  # type: ignore[no-untyped-def]
        for c in chunks:
            yield c

    response = httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"},
                              content=body())
    assert [p async for p in aiter_sse_data(response)] == ['{"n": 1}', "[DONE]"]


async def test_aiter_sse_data_refuses_what_is_not_an_event_stream() -> None:
    response = httpx.Response(200, headers={"content-type": "application/json"}, content=b"{}")
    with pytest.raises(SSEError):
        [p async for p in aiter_sse_data(response)]
