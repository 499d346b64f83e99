"""A client that hangs up at the edges of a request: before its body is read, or as soon as it reads
``[DONE]``. Both were found by benchmarks/soak.py; both are driven here at the ASGI level, where the
moment of the disconnect is chosen by the test instead of by a race."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx

from ferry.gateway.app import create_app
from ferry.gateway.config import parse_config
from gateway.conftest import ENV, MASTER, config_dict

_CHUNKS = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
           {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
           {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
           {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}]


class _SlowToClose(httpx.AsyncByteStream):
    """An upstream stream that sends its answer and ``[DONE]``, then holds the connection a moment
    (as real servers may) before it ends."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in _CHUNKS:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"
        await anyio.sleep(2.0)


def _upstream(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, stream=_SlowToClose(), headers={"content-type": "text/event-stream"})


def _app(tmp_path: Path) -> Any:
    backends = [{"name": "onprem", "url": "http://upstream.test/v1", "location": "onprem", "kind": "openai",
                 "max_concurrency": 4, "timeout": 5, "connect_timeout": 1,
                 "input_per_mtok": 0.05, "output_per_mtok": 0.10}]
    config = parse_config(config_dict(backends, f"sqlite:///{tmp_path / 'ledger.db'}"))
    return create_app(config, ENV, transport=httpx.MockTransport(_upstream))


def _scope(body: bytes) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"authorization", f"Bearer {MASTER}".encode()),
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


async def _rows(app: Any) -> list[dict[str, Any]]:
    gw = app.state.gateway
    return await gw.db(gw.ledger.rows)


async def test_a_client_gone_before_its_body_is_read_gets_a_ledger_row_not_a_500(tmp_path: Path) -> None:
    app = _app(tmp_path)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with app.router.lifespan_context(app):
        await app(_scope(body), receive, send)
        rows = await _rows(app)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert starts and starts[0]["status"] == 499
    assert [(r["status"], r["reason"]) for r in rows] == [(499, "client disconnected before its body was read")]


async def test_a_stream_read_to_done_is_a_200_even_when_the_client_leaves_at_done(tmp_path: Path) -> None:
    app = _app(tmp_path)
    body = json.dumps({"model": "chat", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    got_done = anyio.Event()
    delivered: list[bytes] = []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await got_done.wait()  # NOTE: the client hangs up the moment it has read [DONE]
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            delivered.append(message.get("body", b""))
            if b"[DONE]" in message.get("body", b""):
                got_done.set()

    async with app.router.lifespan_context(app):
        with anyio.fail_after(10):
            await app(_scope(body), receive, send)
        rows = await _rows(app)
    assert b"[DONE]" in b"".join(delivered)
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(200, 5, 1)]
