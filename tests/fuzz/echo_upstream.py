"""A fixed-answer OpenAI-compatible upstream for fuzzing the gateway.

Whatever a body asks (10**18 max_tokens, n=10**9, odd extra fields), it answers one token in the
shape asked for (JSON, or SSE with usage and [DONE]) at once, so that any 5xx the fuzzer sees is
the gateway's own, not this upstream's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def _choice(kind: str, streaming: bool, finish: str | None) -> dict[str, Any]:
    if kind == "text_completion":
        return {"index": 0, "text": "" if finish else "ok", "finish_reason": finish, "logprobs": None}
    if streaming:
        return {"index": 0, "delta": {} if finish else {"role": "assistant", "content": "ok"},
                "finish_reason": finish, "logprobs": None}
    return {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": finish,
            "logprobs": None}


def make_echo_upstream() -> FastAPI:
    app = FastAPI()

    async def answer(request: Request, kind: str) -> Response:
        body = json.loads(await request.body())  # the gateway forwards only JSON objects
        model = str(body.get("model"))
        if body.get("stream") is not True:
            return JSONResponse({"id": "x", "object": kind, "created": 0, "model": model,
                                 "choices": [_choice(kind, False, "stop")], "usage": USAGE})
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

        async def events() -> AsyncIterator[bytes]:
            for finish in (None, "stop"):
                event = {"id": "x", "object": chunk_kind, "created": 0, "model": model,
                         "choices": [_choice(kind, True, finish)]}
                yield f"data: {json.dumps(event)}\n\n".encode()
            usage = {"id": "x", "object": chunk_kind, "created": 0, "model": model, "choices": [],
                     "usage": USAGE}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, "text_completion")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                         "owned_by": "echo"}]})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    return app
