"""The app in-process over a deterministic fake engine: wire format, errors, admission, disconnects.

The fake engine (see conftest) answers choice i of prompt P with P's bytes repeated from offset i, so
every expected text below is computed, not recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import httpx
import pytest

from ferry.config import ServerConfig
from ferry.server import build_app, get_state
from ferry.server.logging import JsonFormatter
from ferry.server.metrics import parse_prometheus, sample
from ferry.sse import parse_sse

from .conftest import FakeEngine, make_client

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
TEMPLATE = "<user>hello\n<assistant>"  # what the fake tokenizer's chat template renders


def cycle(text: str, start: int, k: int) -> str:
    data = text.encode()
    return bytes(data[(start + i) % len(data)] for i in range(k)).decode()


# ------------------------------------------------------------------------------------- chat


async def test_chat_non_streaming_wire_format(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["message"] == {"role": "assistant", "content": cycle(TEMPLATE, c["index"], 6)}
        assert c["finish_reason"] == "length" and c["logprobs"] is None
    n_prompt = len(TEMPLATE.encode())
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12,
                             "total_tokens": n_prompt + 12,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert r.headers["x-request-id"]


async def test_chat_streaming_matches_non_streaming(client: httpx.AsyncClient) -> None:
    req = {**CHAT, "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = parse_sse(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" in c for c in chunks)  # include_usage: null on every chunk but the last
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text_chunks = [c for c in chunks if c["choices"]]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert all(c["usage"] is None for c in text_chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in text_chunks)
    assert text == cycle(TEMPLATE, 0, 9)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9


async def test_chat_stream_without_usage_has_no_usage_key(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "stream": True})
    chunks = [json.loads(p) for p in parse_sse(r.text)[:-1]]
    assert chunks and all("usage" not in c for c in chunks)


async def test_chat_logprobs_and_stop(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "max_tokens": 20, "logprobs": True, "top_logprobs": 2, "stop": ["hel"]})
    choice = r.json()["choices"][0]
    # "<user>hello\n<assistant><user>hel..." -> cut before the stop string
    assert choice["message"]["content"] == "<user>"
    assert choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [t["token"] for t in content[:3]] == ["<", "u", "s"]
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [ord("<")]
    assert len(content[0]["top_logprobs"]) == 2


# ------------------------------------------------------------------------------------- completions


async def test_completions_prompt_lists_n_and_echo(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={
        "prompt": ["abc", "wxyz"], "n": 2, "max_tokens": 5, "echo": True, "logprobs": 1})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    texts = {c["index"]: c["text"] for c in body["choices"]}
    assert texts == {0: "abc" + cycle("abc", 0, 5), 1: "abc" + cycle("abc", 1, 5),
                     2: "wxyz" + cycle("wxyz", 0, 5), 3: "wxyz" + cycle("wxyz", 1, 5)}
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"][:3] == ["a", "b", "c"] and lp["token_logprobs"][:3] == [None] * 3
    assert lp["token_logprobs"][3:] == [-0.25] * 5
    assert lp["text_offset"] == list(range(8))
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 20


async def test_completions_token_ids_and_stream(client: httpx.AsyncClient) -> None:
    ids = [ord(c) + 3 for c in "hey"]
    r = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "stream": True,
                                                   "echo": True})
    chunks = [json.loads(p) for p in parse_sse(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hey" + cycle("hey", 0, 4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_completions_stream_multi_prompt(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={
        "prompt": ["ab", "cde"], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = [json.loads(p) for p in parse_sse(r.text)[:-1]]
    got: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        got[choice["index"]] = got.get(choice["index"], "") + choice["text"]
    assert got == {0: cycle("ab", 0, 4), 1: cycle("cde", 0, 4)}
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
                                   "prompt_tokens_details": {"cached_tokens": 4}}


# ------------------------------------------------------------------------------------- errors


def _err(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def test_error_shapes(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert _err(r, 400)["code"] == "invalid_json"
    assert _err(await client.post("/v1/chat/completions", content=b"[1]"), 400)["message"]
    err = _err(await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    err = _err(await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000}), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    err = _err(await client.post("/v1/completions", json={"prompt": "x" * 300}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    err = _err(await client.post("/v1/completions", json={"prompt": [5, 9999]}), 400)
    assert err["param"] == "prompt" and "vocabulary" in err["message"]
    err = _err(await client.post("/v1/chat/completions", json={**CHAT, "top_k": -5}), 400)
    assert err["param"] == "top_k"
    err = _err(await client.post("/v1/completions", json={"prompt": "x", "seed": 2**70}), 400)
    assert err["param"] == "seed"
    # tools without tool_choice mean "auto", which needs --enable-auto-tool-choice (as vLLM)
    err = _err(await client.post("/v1/chat/completions", json={
        **CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}), 400)
    assert err["param"] == "tool_choice" and "--enable-auto-tool-choice" in err["message"]
    # 3 prompts x n=100 = 300 sequences > capacity (max_num_seqs 4 + max_queue 256): never admissible
    err = _err(await client.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 100}), 400)
    assert err["param"] == "n"
    assert _err(await client.get("/v1/nope"), 404)["message"]


async def test_null_and_bookkeeping_fields_are_accepted(client: httpx.AsyncClient) -> None:
    # What LiteLLM / LangChain / a replayed openai-SDK history send: every field of their message
    # types, unset ones as null or empty, plus OpenAI's bookkeeping fields.
    history = [
        {"role": "system", "content": "be brief", "name": None},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "yo", "tool_calls": None, "refusal": None,
         "function_call": None, "audio": None, "name": None},
        {"role": "assistant", "content": None, "refusal": "no", "tool_calls": []},
        {"role": "user", "content": "hello", "tool_call_id": None},
    ]
    r = await client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": history, "max_tokens": 4, "tools": None,
        "tool_choice": None, "functions": None, "function_call": None,
        "parallel_tool_calls": True, "reasoning_effort": None, "metadata": {"app": "x"},
        "store": False, "service_tier": "auto", "user": "u1", "modalities": None,
        "prediction": None, "audio": None, "logit_bias": None, "web_search_options": {}})
    assert r.status_code == 200, r.text
    template = ("<system>be brief\n<user>hi\n<assistant>yo\n<assistant>no\n<user>hello\n"
                "<assistant>")
    assert r.json()["choices"][0]["message"]["content"] == cycle(template, 0, 4)
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "ab",
                                                   "max_tokens": 2, "store": None, "suffix": None,
                                                   "metadata": None, "stream_options": None})
    assert r.status_code == 200, r.text
    # a set value of a feature the server lacks is still a clear 400
    err = _err(await client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"5": 1.0}}), 400)
    assert err["param"] == "logit_bias"
    # an unknown field is ignored with a warning, as vLLM does (--strict-params: a 400, tests/tools)
    r = await client.post("/v1/chat/completions", json={**CHAT, "frobnicate": 1})
    assert r.status_code == 200, r.text


@pytest.fixture
def small_app(fake_engine: FakeEngine) -> Any:
    return build_app(fake_engine, ServerConfig(api_key="k3y", max_queue=1, max_body_bytes=2000),
                     max_num_seqs=1)


async def test_auth_on_v1_only(small_app: Any) -> None:
    async with make_client(small_app) as c:
        for path in ("/v1/models", "/v1/models/fake-model"):
            assert _err(await c.get(path), 401)["code"] == "invalid_api_key"
            assert _err(await c.get(path, headers={"Authorization": "Bearer nope"}), 401)
            assert (await c.get(path, headers={"Authorization": "Bearer k3y"})).status_code == 200
        assert _err(await c.post("/v1/chat/completions", content=b"{bad"), 401)
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/version")).json()["version"]


async def test_body_size_limit(small_app: Any) -> None:
    auth = {"Authorization": "Bearer k3y"}
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    async with make_client(small_app) as c:
        err = _err(await c.post("/v1/chat/completions", content=big, headers=auth), 413)
        assert err["code"] == "request_too_large"

        async def chunked():  # no Content-Length: the limit applies to the streamed body
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        _err(await c.post("/v1/chat/completions", content=chunked(), headers=auth), 413)


async def test_engine_failure_fails_that_request_alone(client: httpx.AsyncClient,
                                                       fake_engine: FakeEngine) -> None:
    ok, bad = await asyncio.gather(
        client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 8}),
        client.post("/v1/completions", json={"prompt": "FAIL now", "max_tokens": 8}))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == cycle("fine", 0, 8)
    err = _err(bad, 500)
    assert err["type"] == "server_error" and "step failed" in err["message"]
    r = await client.post("/v1/completions", json={"prompt": "FAIL", "max_tokens": 8, "stream": True})
    payloads = parse_sse(r.text)
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["type"] == "server_error"
    assert fake_engine.running == set()
    assert get_state(client._transport.app).admission.in_flight == 0  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- admission


async def _wait_for(pred: Any, what: str) -> None:
    for _ in range(2000):  # bounded: ~ a few seconds of event-loop turns
        if pred():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def test_admission_429_then_admitted_finish(fake_engine: FakeEngine) -> None:
    fake_engine.gate = asyncio.Event()
    app = build_app(fake_engine, ServerConfig(max_queue=1), max_num_seqs=1)
    state = get_state(app)
    async with make_client(app) as c:
        held = [asyncio.create_task(c.post("/v1/completions", json={"prompt": p, "max_tokens": 3}))
                for p in ("one", "two")]
        await _wait_for(lambda: len(fake_engine.running) == 2, "two admitted requests")
        assert state.admission.in_flight == 2 and state.admission.waiting == 1
        rejected = await c.post("/v1/completions", json={"prompt": "three", "max_tokens": 3})
        err = _err(rejected, 429)
        assert rejected.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
        fake_engine.gate.set()
        done = await asyncio.gather(*held)
        assert [r.json()["choices"][0]["text"] for r in done] == ["one", "two"]
        metrics = parse_prometheus((await c.get("/metrics")).text)
        assert sample(metrics, "ferry:admission_rejections_total") == 1
        assert sample(metrics, "ferry:request_success_total", finished_reason="length") == 2
    assert state.admission.in_flight == 0


# ------------------------------------------------------------------------------------- disconnects


async def _call_asgi(app: Any, body: dict[str, Any], disconnect: asyncio.Event,
                     on_body: Any = None) -> list[dict[str, Any]]:
    """Drive the ASGI app directly, with a client that disconnects when ``disconnect`` is set."""
    raw = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if on_body is not None and message["type"] == "http.response.body":
            on_body(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return sent


async def test_disconnect_while_waiting_aborts(fake_engine: FakeEngine) -> None:
    fake_engine.gate = asyncio.Event()
    app = build_app(fake_engine, ServerConfig(), max_num_seqs=2)
    for stream in (False, True):
        gone = asyncio.Event()
        task = asyncio.create_task(_call_asgi(
            app, {"prompt": "abc", "max_tokens": 50, "stream": stream}, gone))
        await _wait_for(lambda: len(fake_engine.running) == 1, "the request to reach the engine")
        gone.set()
        await task
        assert fake_engine.running == set()
        assert len(fake_engine.aborted) == (2 if stream else 1)
        assert get_state(app).admission.in_flight == 0


async def test_disconnect_mid_stream_aborts(fake_engine: FakeEngine) -> None:
    app = build_app(fake_engine, ServerConfig(), max_num_seqs=2)
    gone = asyncio.Event()
    bodies: list[bytes] = []

    def on_body(message: dict[str, Any]) -> None:
        bodies.append(message.get("body", b""))
        if len(bodies) == 3:
            gone.set()

    # NOTE: the fake engine yields to the loop after every token, so the disconnect lands mid-way.
    await _call_asgi(app, {"prompt": "abc", "max_tokens": 200, "stream": True}, gone, on_body)
    assert 3 <= len(bodies) < 200
    assert fake_engine.aborted and not fake_engine.finished
    assert fake_engine.running == set() and get_state(app).admission.in_flight == 0


# ------------------------------------------------------------------------------------- loading


async def test_health_503_while_loading_then_200(fake_engine: FakeEngine) -> None:
    release = threading.Event()

    def loader() -> FakeEngine:
        release.wait(30)
        return fake_engine

    app = build_app(loader, ServerConfig())
    async with app.router.lifespan_context(app), make_client(app) as c:
        r = await c.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert _err(await c.post("/v1/chat/completions", json=CHAT), 503)["code"] == "model_not_ready"
        release.set()
        await asyncio.wait_for(app.state.load_task, 30)
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "fake-model"
    assert fake_engine.shut_down  # the app loaded the engine, so the app shuts it down


async def test_failed_load_is_reported() -> None:
    def loader() -> FakeEngine:
        raise FileNotFoundError("no such model")

    app = build_app(loader, ServerConfig())
    async with app.router.lifespan_context(app), make_client(app) as c:
        await asyncio.wait_for(app.state.load_task, 30)
        r = await c.get("/health")
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]


async def test_health_503_when_the_engine_thread_died(fake_engine: FakeEngine) -> None:
    fake_engine.is_running = False
    fake_engine.dead_reason = "RuntimeError: boom"
    app = build_app(fake_engine, ServerConfig())
    async with make_client(app) as c:
        r = await c.get("/health")
    assert r.status_code == 503 and "boom" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------- admin


async def test_tokenize_detokenize_models(client: httpx.AsyncClient) -> None:
    r = (await client.post("/tokenize", json={"prompt": "hi", "return_token_strs": True})).json()
    assert r == {"count": 2, "max_model_len": 256, "tokens": [ord("h") + 3, ord("i") + 3],
                 "token_strs": ["h", "i"]}
    r = (await client.post("/tokenize", json={"messages": CHAT["messages"]})).json()
    assert r["count"] == len(TEMPLATE.encode())
    assert (await client.post("/detokenize", json={"tokens": r["tokens"]})).json() == {
        "prompt": TEMPLATE}
    _err(await client.post("/tokenize", json={}), 400)
    _err(await client.post("/detokenize", json={"tokens": [100000]}), 400)
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    _err(await client.get("/v1/models/other"), 404)


async def test_access_log_one_line_per_request(client: httpx.AsyncClient,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ferry.server.access"):
        await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4},
                          headers={"x-request-id": "req-42"})
        await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0})
    records = [r for r in caplog.records if r.name == "ferry.server.access"]
    assert len(records) == 2
    ok = records[0].ferry_fields  # type: ignore[attr-defined]
    assert ok["request_id"] == "req-42" and ok["status"] == 200
    assert ok["prompt_tokens"] == 3 and ok["completion_tokens"] == 4 and ok["ttft_ms"] is not None
    assert records[1].ferry_fields["status"] == 400  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-42" and line["logger"] == "ferry.server.access"
