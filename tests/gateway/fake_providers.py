"""Fake cloud providers on loopback that speak each API as its documentation describes.

``anthropic``: ``POST /v1/messages`` (the key in ``x-api-key`` or, as Anthropic's SDKs of 2026 send
it, ``Authorization: Bearer``, and ``anthropic-version``, required; the documented
event sequence when streaming: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta, message_stop; its error shape and 529 when overloaded) and
``GET /v1/models``. ``azure``: ``POST /openai/deployments/{name}/chat/completions?api-version=``
(``api-key`` header or an Entra bearer token; 404 ``DeploymentNotFound``) and ``GET /openai/models``.
Each records what it received, so tests can check the translation on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from gateway.upstream import WORDS, ServerThread

ANTHROPIC_KEY = "sk-ant-test"
AZURE_KEY = "azure-test-key"
AZURE_TOKEN = "entra-test-token"


@dataclass
class ProviderState:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    overloaded: int = 0  # answer this many requests with 529 (anthropic) / 503 (azure)


def _words(seed_text: str, n: int) -> list[str]:
    seed = sum(seed_text.encode()) % len(WORDS)
    return [WORDS[(seed + i) % len(WORDS)] for i in range(n)]


def _anthropic_error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m["role"] != "user":
            continue
        content = m["content"]
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content if b.get("type") == "text")
    return ""


def _anthropic_answer(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None, int]:
    """The content blocks, stop reason, stop sequence and input tokens the fake model answers with."""
    text = _last_user_text(body["messages"])
    system = body.get("system") or ""
    input_tokens = len((str(system) + " " + json.dumps(body["messages"])).split())
    if body.get("tools") and "weather" in text and (body.get("tool_choice") or {}).get("type") != "none":
        tool = body["tools"][0]
        return ([{"type": "text", "text": "Let me check."},
                 {"type": "tool_use", "id": "toolu_01", "name": tool["name"], "input": {"city": "Paris"}}],
                "tool_use", None, input_tokens)
    words = _words(text, body["max_tokens"])
    for i, w in enumerate(words):
        if w in (body.get("stop_sequences") or ()):
            return [{"type": "text", "text": " ".join(words[:i]) + " "}], "stop_sequence", w, input_tokens
    reason = "max_tokens" if body["max_tokens"] <= 8 else "end_turn"
    return [{"type": "text", "text": " ".join(words[:8])}], reason, None, input_tokens


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _anthropic_key_ok(request: Request) -> bool:
    return ANTHROPIC_KEY in (request.headers.get("x-api-key"),
                             request.headers.get("authorization", "").removeprefix("Bearer "))


def make_anthropic(state: ProviderState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        state.paths.append(request.url.path)
        state.headers.append(dict(request.headers))
        if not _anthropic_key_ok(request):
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _anthropic_error(400, "invalid_request_error", "anthropic-version header is required")
        body = await request.json()
        state.bodies.append(body)
        if state.overloaded > 0:
            state.overloaded -= 1
            return _anthropic_error(529, "overloaded_error", "Overloaded")
        for key in ("model", "max_tokens", "messages"):
            if key not in body:
                return _anthropic_error(400, "invalid_request_error", f"{key}: Field required")
        if any(m.get("role") not in ("user", "assistant") for m in body["messages"]):
            return _anthropic_error(400, "invalid_request_error", "messages: roles must be user or assistant")
        content, reason, stop_sequence, input_tokens = _anthropic_answer(body)
        output_tokens = sum(len(b.get("text", "").split()) or 1 for b in content)
        message = {"id": "msg_fake01", "type": "message", "role": "assistant", "model": body["model"],
                   "content": content, "stop_reason": reason, "stop_sequence": stop_sequence,
                   "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2}}
        if not body.get("stream"):
            return JSONResponse(message)

        def events() -> Iterator[bytes]:
            start = dict(message, content=[], stop_reason=None, stop_sequence=None,
                         usage=dict(message["usage"], output_tokens=1))
            yield _sse("message_start", {"type": "message_start", "message": start})
            for i, block in enumerate(content):
                if block["type"] == "text":
                    yield _sse("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "text", "text": ""}})
                    if i == 0:
                        yield _sse("ping", {"type": "ping"})
                    for piece in block["text"].split(" "):
                        yield _sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                           "delta": {"type": "text_delta", "text": piece + " "}})
                else:
                    yield _sse("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "tool_use", "id": block["id"],
                                                                         "name": block["name"], "input": {}}})
                    raw = json.dumps(block["input"])
                    for j in range(0, len(raw), 5):
                        yield _sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                           "delta": {"type": "input_json_delta",
                                                                     "partial_json": raw[j:j + 5]}})
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": i})
            yield _sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                                         "usage": {"output_tokens": output_tokens}})
            yield _sse("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not _anthropic_key_ok(request):
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        return JSONResponse({"data": [{"type": "model", "id": "claude-fake", "display_name": "Claude Fake",
                                       "created_at": "2026-01-01T00:00:00Z"}],
                             "has_more": False, "first_id": "claude-fake", "last_id": "claude-fake"})

    return app


def _azure_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def make_azure(state: ProviderState, deployments: tuple[str, ...] = ("gpt-4o-prod",),
               api_version: str = "2024-10-21") -> FastAPI:
    app = FastAPI()

    def auth_error(request: Request) -> Response | None:
        if request.query_params.get("api-version") != api_version:
            return _azure_error(404, "404", "Resource not found")  # Azure's answer to a wrong api-version
        if request.headers.get("api-key") == AZURE_KEY:
            return None
        if request.headers.get("authorization") == f"Bearer {AZURE_TOKEN}":
            return None
        return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def chat(deployment: str, request: Request) -> Response:
        state.paths.append(f"{request.url.path}?{request.url.query}")
        state.headers.append(dict(request.headers))
        if (error := auth_error(request)) is not None:
            return error
        if deployment not in deployments:
            return _azure_error(404, "DeploymentNotFound",
                                "The API deployment for this resource does not exist.")
        body = await request.json()
        state.bodies.append(body)
        if state.overloaded > 0:
            state.overloaded -= 1
            return _azure_error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
        n = body.get("max_tokens") or 4
        words = _words(json.dumps(body["messages"]), n)
        usage = {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}
        base = {"id": "chatcmpl-az", "created": 1, "model": "gpt-4o-2024-08-06"}
        if not body.get("stream"):
            return JSONResponse(dict(base, object="chat.completion", usage=usage, choices=[
                {"index": 0, "finish_reason": "length", "message": {"role": "assistant",
                                                                    "content": " ".join(words)}}]))

        def events() -> Iterator[bytes]:
            for i, w in enumerate(words):
                delta = {"content": w + " "} | ({"role": "assistant"} if i == 0 else {})
                yield f"data: {json.dumps(dict(base, object='chat.completion.chunk', choices=[{'index': 0, 'delta': delta, 'finish_reason': None}]))}\n\n".encode()
            yield f"data: {json.dumps(dict(base, object='chat.completion.chunk', choices=[{'index': 0, 'delta': {}, 'finish_reason': 'length'}]))}\n\n".encode()
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps(dict(base, object='chat.completion.chunk', choices=[], usage=usage))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/openai/models")
    async def models(request: Request) -> Response:
        state.paths.append(f"{request.url.path}?{request.url.query}")
        if (error := auth_error(request)) is not None:
            return error
        return JSONResponse({"data": [{"id": "gpt-4o", "object": "model"}], "object": "list"})

    return app


def start_provider(kind: str, **kw: Any) -> tuple[ProviderState, ServerThread]:
    state = ProviderState()
    app = make_anthropic(state) if kind == "anthropic" else make_azure(state, **kw)
    return state, ServerThread(app).start()
