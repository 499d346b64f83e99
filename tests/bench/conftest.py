"""Real HTTP servers on 127.0.0.1 for the bench tests: the naive HF baseline on a tiny random Llama, a
fault server (HTTP errors, cut streams, hangs, streams without usage), and a port that drops connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ferry_server import ServerProcess, free_port

NO_USAGE_CHUNKS = ("Hello", " there", ",", " friend", "!")


class ServerThread:
    """A uvicorn server on a pre-bound loopback socket, run in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def fault_app() -> FastAPI:
    """An OpenAI-shaped server whose behaviour is chosen by the request's ``model``."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "no-usage", "object": "model"}]}

    def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
        delta = {"content": text} if text is not None else {}
        return {"id": "x", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        model = body.get("model")
        if model == "http-500":
            return JSONResponse(status_code=500, content={"error": {
                "message": "engine exploded", "type": "server_error", "param": None, "code": None}})
        if model == "http-429":
            return JSONResponse(status_code=429, content={"error": {
                "message": "slow down", "type": "rate_limit_error", "param": None, "code": None}})

        async def no_usage() -> AsyncIterator[str]:
            for piece in NO_USAGE_CHUNKS:
                yield _sse(chunk(piece))
            yield _sse(chunk(None, "stop"))
            yield "data: [DONE]\n\n"

        async def cut() -> AsyncIterator[str]:
            yield _sse(chunk("partial"))
            yield _sse(chunk(" answer"))
            raise RuntimeError("simulated crash mid-stream")  # uvicorn drops the connection

        async def hang() -> AsyncIterator[str]:
            yield _sse(chunk("first"))
            await asyncio.sleep(60)
            yield "data: [DONE]\n\n"

        async def garbage() -> AsyncIterator[str]:
            yield "data: this is not json\n\n"

        async def in_stream_error() -> AsyncIterator[str]:
            yield _sse(chunk("a"))
            yield _sse({"error": {"message": "out of blocks", "type": "server_error"}})

        if model == "not-streaming":
            return {"id": "x", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}]}
        streams = {"no-usage": no_usage, "cut": cut, "hang": hang, "garbage": garbage,
                   "stream-error": in_stream_error}
        if model not in streams:
            return JSONResponse(status_code=404, content={"error": {"message": f"no model {model}"}})
        return StreamingResponse(streams[model](), media_type="text/event-stream")

    return app


class ClosingPort:
    """Accepts TCP connections and closes them at once, before any HTTP answer."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            self.accepted += 1
            conn.close()

    def __enter__(self) -> "ClosingPort":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def unused_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    return free_port()


@pytest.fixture(scope="session")
def naive_server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    from ferry.bench.naive_server import NaiveModel, create_app

    app = create_app(NaiveModel(tiny_llama_dir, threads=1), served_name="tiny-llama")
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="session")
def fault_server() -> Iterator[ServerThread]:
    with ServerThread(fault_app()) as server:
        yield server


@pytest.fixture()
def unreachable_url() -> str:
    return f"http://127.0.0.1:{unused_port()}"


@pytest.fixture()
def no_usage_chunks() -> tuple[str, ...]:
    """The text pieces the fault server streams for model ``no-usage``."""
    return NO_USAGE_CHUNKS


@pytest.fixture()
def closing_port() -> Iterator[ClosingPort]:
    with ClosingPort() as port:
        yield port


@pytest.fixture(scope="module")
def ferry_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("ferry-serve") / "serve.log"
    with ServerProcess(tiny_llama_dir, log, "--kv-cache-memory", "64MiB", "--log-level", "warning") as server:
        yield server
