"""A small, honest OpenAI-compatible upstream for gateway tests, plus a thread that serves any ASGI app.

It streams deterministic text, reports usage, and publishes ferry-style Prometheus gauges at /metrics.
Tests steer it through its ``UpstreamState`` (slow, failing, saturated, a stream that breaks) and read
back what it saw: requests, cancellations, tokens, the bodies it got.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa")


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content", "")) for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(prompt)


def reply_words(text: str, n: int) -> list[str]:
    """Deterministic: the same prompt always gets the same words."""
    seed = sum(text.encode()) % len(WORDS)
    return [WORDS[(seed + i) % len(WORDS)] for i in range(n)]


@dataclass
class UpstreamState:
    name: str
    delay: float = 0.0  # seconds before the first byte
    token_delay: float = 0.0  # seconds between streamed tokens
    fail_status: int | None = None  # answer every request with this status …
    fail_count: int | None = None  # … this many times (None: always)
    break_stream_before_token: bool = False  # send the role chunk, then drop the connection
    capacity: int | None = None  # running above this shows up as waiting
    forced_waiting: float = 0.0
    forced_kv_usage: float = 0.0
    template_tokens: int = 0  # a chat template's tokens around the messages (a default system prompt, ...)
    max_model_len: int = 4096  # what /tokenize reports
    embeddings: bool = True  # False: /v1/embeddings answers 404, as ferry serve does today
    models_gate: threading.Event | None = None  # set: GET /v1/models (the health check) waits until it is set
    # what it saw
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    running: int = 0
    max_running: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    tokenized: int = 0  # /tokenize calls
    bodies: list[dict[str, Any]] = field(default_factory=list)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def waiting(self) -> float:
        extra = max(0, self.running - self.capacity) if self.capacity is not None else 0
        return self.forced_waiting + extra


def _should_fail(state: UpstreamState) -> int | None:
    if state.fail_status is None:
        return None
    if state.fail_count is None:
        return state.fail_status
    if state.fail_count > 0:
        state.fail_count -= 1
        return state.fail_status
    return None


def make_upstream(state: UpstreamState) -> FastAPI:
    app = FastAPI()

    async def sleep_or_disconnect(request: Request, seconds: float) -> bool:
        """Sleep; True when the client went away meanwhile (as a real server aborts the request)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(min(0.02, max(0.0, end - time.monotonic())))
        return False

    async def generate(request: Request, kind: str) -> Response:
        body = await request.json()
        with state.lock:
            state.requests += 1
            state.bodies.append(body)
            state.request_headers.append(dict(request.headers))
            failing = _should_fail(state)
        if failing is not None:
            return JSONResponse({"error": {"message": f"{state.name} told to fail", "type": "server_error",
                                           "param": None, "code": None}}, status_code=failing)
        text = prompt_text(body)
        prompt_tokens = len(text.split()) + (state.template_tokens if kind == "chat" else 0)
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 8)
        words = reply_words(text, n)
        model = body["model"]
        rid = f"{kind}-{state.name}-{state.requests}"
        state.running += 1
        state.max_running = max(state.max_running, state.running)

        def finish(completion_tokens: int, cancelled: bool) -> None:
            with state.lock:
                state.running -= 1
                if cancelled:
                    state.cancelled += 1
                else:
                    state.completed += 1
                    state.prompt_tokens_total += prompt_tokens
                    state.completion_tokens_total += completion_tokens

        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            try:
                if await sleep_or_disconnect(request, state.delay + state.token_delay * n):
                    finish(0, True)
                    return Response(status_code=499)
            except asyncio.CancelledError:
                finish(0, True)
                raise
            finish(n, False)
            content = " ".join(words)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length",
                          "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": content, "finish_reason": "length", "logprobs": None}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                                 "choices": [choice], "usage": usage})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: str | None, finish_reason: str | None, role: bool = False) -> bytes:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": delta_text}
                if finish_reason:
                    delta = {}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish_reason, "logprobs": None}
            event = {"id": rid, "object": obj, "created": 0, "model": model, "choices": [choice]}
            if include_usage:
                event["usage"] = None
            return f"data: {json.dumps(event)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            sent = 0
            try:
                await asyncio.sleep(state.delay)
                if kind == "chat":
                    yield chunk(None, None, role=True)
                if state.break_stream_before_token:
                    raise ConnectionError(f"{state.name} told to break the stream")
                for i, w in enumerate(words):
                    if i:
                        await asyncio.sleep(state.token_delay)
                    yield chunk(w if i == 0 else " " + w, None)
                    sent += 1
                yield chunk(None, "length")
                if include_usage:
                    event = {"id": rid, "object": obj, "created": 0, "model": model, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(event)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                finish(sent, True)
                raise
            except ConnectionError:
                finish(sent, True)
                raise
            finish(sent, False)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings: a deterministic unit-ish vector per input, usage with prompt tokens only."""
        body = await request.json()
        with state.lock:
            state.requests += 1
            state.bodies.append(body)
            state.request_headers.append(dict(request.headers))
            failing = 404 if not state.embeddings else _should_fail(state)
        if failing is not None:
            return JSONResponse({"error": {"message": f"{state.name}: no embeddings here" if failing == 404
                                           else f"{state.name} told to fail", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=failing)
        value = body["input"]
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        dims = int(body.get("dimensions") or 8)
        data, tokens = [], 0
        for i, item in enumerate(items):
            n = len(item) if isinstance(item, list) else len(item.split())
            tokens += n
            seed = sum(str(item).encode())
            vector = [((seed * (k + 1)) % 97) / 97.0 for k in range(dims)]
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        with state.lock:
            state.completed += 1
            state.prompt_tokens_total += tokens
        return JSONResponse({"object": "list", "data": data, "model": body["model"],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """Like ferry serve's: the prompt's token count as this upstream bills it, template included."""
        body = await request.json()
        with state.lock:
            state.tokenized += 1
        count = len(prompt_text(body).split()) + (state.template_tokens if "messages" in body else 0)
        return JSONResponse({"count": count, "max_model_len": state.max_model_len, "tokens": list(range(count))})

    @app.get("/v1/models")
    async def models() -> Response:
        if state.models_gate is not None:
            await asyncio.to_thread(state.models_gate.wait, 30)
        if state.fail_status is not None and state.fail_count is None:  # broken for good: health fails too
            return JSONResponse({"error": {"message": "down"}}, status_code=state.fail_status)
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                         "owned_by": state.name}]})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = [
            "# TYPE ferry:num_requests_running gauge",
            f'ferry:num_requests_running{{model_name="m"}} {state.running}',
            "# TYPE ferry:num_requests_waiting gauge",
            f'ferry:num_requests_waiting{{model_name="m"}} {state.waiting}',
            "# TYPE ferry:kv_cache_usage_perc gauge",
            f'ferry:kv_cache_usage_perc{{model_name="m"}} {state.forced_kv_usage}',
            "# TYPE ferry:prompt_tokens counter",
            f'ferry:prompt_tokens_total{{model_name="m"}} {state.prompt_tokens_total}',
            "# TYPE ferry:generation_tokens counter",
            f'ferry:generation_tokens_total{{model_name="m"}} {state.completion_tokens_total}',
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def bind_free_port(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class ServerThread:
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1; ``stop`` and ``start`` keep the port."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        sock = bind_free_port(self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError(f"server on port {self.port} did not stop")
        self._server = None
        self._thread = None


def start_upstream(name: str, **kwargs: Any) -> tuple[UpstreamState, ServerThread]:
    state = UpstreamState(name, **kwargs)
    return state, ServerThread(make_upstream(state)).start()
