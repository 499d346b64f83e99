"""Bad input and unforeseen upstream answers: OpenAI-shaped errors, a closed ledger row, no leaked slot.

In-process: the gateway app over an ``httpx.MockTransport`` upstream, driven through ``ASGITransport``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ferry.gateway.app import create_app
from ferry.gateway.config import parse_config
from ferry.gateway.proxy import InferenceHandler
from gateway.conftest import ENV, MASTER, config_dict

MSG = [{"role": "user", "content": "hello"}]


def _upstream(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        events = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": "lots", "completion_tokens": 1}}]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


@pytest.fixture
def app(tmp_path: Any) -> Any:
    b = {"name": "a", "url": "http://a/v1", "location": "onprem", "kind": "openai", "max_concurrency": 2}
    return create_app(parse_config(config_dict([b], f"sqlite:///{tmp_path}/gw.db")), ENV,
                      transport=httpx.MockTransport(_upstream))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://gw", headers={"Authorization": f"Bearer {MASTER}"})


async def test_stream_options_not_an_object_is_400_and_takes_no_slot(app: Any) -> None:
    gw = app.state.gateway
    async with _client(app) as c:
        for _ in range(3):  # more than max_concurrency: a leaked slot would show
            r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": MSG, "stream": True,
                                                           "stream_options": "yes"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
        r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": MSG})
        assert r.status_code == 200
    assert gw.backends["a"].inflight == 0
    assert [row["status"] for row in gw.ledger.rows()] == [400, 400, 400, 200]


async def test_malformed_upstream_usage_does_not_cut_the_stream(app: Any) -> None:
    gw = app.state.gateway
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": MSG, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    row = gw.ledger.rows()[0]
    assert (row["status"], row["reason"]) == (200, "upstream reported no usage")
    assert gw.backends["a"].inflight == 0


async def test_an_unforeseen_error_is_an_openai_500_with_the_row_closed(app: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(InferenceHandler, "_complete", broken)
    gw = app.state.gateway
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": MSG})
    assert r.status_code == 500 and r.json()["error"]["code"] == "gateway_error"
    row = gw.ledger.rows()[0]
    assert row["status"] == 500 and "RuntimeError: boom" in row["reason"]
    assert gw.backends["a"].inflight == 0


async def test_an_error_event_after_tokens_is_a_502_in_the_ledger(tmp_path: Any) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        events = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
                  {"error": {"message": "engine died", "type": "server_error", "param": None, "code": None}}]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    b = {"name": "a", "url": "http://a/v1", "location": "onprem", "kind": "openai", "max_concurrency": 2}
    app = create_app(parse_config(config_dict([b], f"sqlite:///{tmp_path}/gw.db")), ENV,
                     transport=httpx.MockTransport(upstream))
    gw = app.state.gateway
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": MSG, "stream": True})
    assert r.status_code == 200 and "engine died" in r.text  # passed through: tokens had been sent
    row = gw.ledger.rows()[0]
    assert row["status"] == 502 and "error mid-stream" in row["reason"] and "engine died" in row["reason"]
    assert gw.backends["a"].inflight == 0 and gw.backends["a"].breaker.failures == 1


async def test_framework_errors_are_in_openai_shape(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def err(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]

    def broken() -> Any:
        raise RuntimeError("db down")

    monkeypatch.setattr(app.state.gateway.keys, "list", broken)
    async with _client(app) as c:
        assert "/v1/nope" in err(await c.get("/v1/nope"), 404)["message"]
        assert err(await c.get("/v1/chat/completions"), 405)["type"] == "invalid_request_error"
        assert err(await c.delete("/admin/usage"), 405)["message"]
        assert err(await c.get("/admin/keys"), 500)["type"] == "server_error"
