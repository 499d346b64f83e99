"""The soak test's "cloud": a light OpenAI-compatible server that streams made-up tokens and records,
before it answers, every request it receives.

It stands in for a cloud provider in `benchmarks/soak.py`, so that what reached the cloud is counted at
the cloud itself, not taken from the gateway's word. Each received request becomes one JSON line in
``--record`` (appended and flushed before the answer starts, so a request is on file even when the
process is killed a moment later, and the file outlives restarts):

    {"t": 1760000000.1, "path": "/v1/chat/completions", "tags": ["soak-pii-000042"], "planted": ["…"]}

``tags`` are the ``[soak-<kind>-<n>]`` markers the soak writes into every prompt; ``planted`` the PII
values (from ``--planted``, a JSON list of strings) found anywhere in the body's text. It validates
bodies the way OpenAI does where the soak relies on it (400 for a malformed body, a prompt past
``--max-context-tokens``), and serves ``/v1/models`` and ``/health``.

    python benchmarks/soak_cloud.py --port 9001 --record cloud.jsonl --planted planted.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TAG = re.compile(r"\[(soak-[a-z_]+-\d+)\]")
ROLES = ("system", "developer", "user", "assistant")
WORDS = ("cloud", "tokens", "arrive", "quickly", "and", "the", "answer", "goes", "on", "until", "done")
DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 64  # NOTE: a fake need not honour max_tokens 512; the soak measures plumbing, not length
CHARS_PER_TOKEN = 4


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


def _part_texts(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.{i}: expected a text part", f"{where}.{i}")
            out.append(part["text"])
        return out
    raise BadRequest(f"{where}: must be a string or a list of text parts", where)


def body_texts(body: dict[str, Any], chat: bool) -> list[str]:
    """Every prompt text in a body; ``BadRequest`` for the shapes OpenAI refuses."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: must be a non-empty list", "messages")
        texts: list[str] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRequest(f"messages.{i}.role: must be one of {ROLES}", f"messages.{i}.role")
            texts += _part_texts(m.get("content"), f"messages.{i}.content")
        return texts
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise BadRequest("prompt: must be a string or a list of strings", "prompt")


def check_sampling(body: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or not 0 <= temperature <= 2):
        raise BadRequest("temperature: must be a number in [0, 2]", "temperature")


def max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest("max_tokens: must be a positive integer", "max_tokens")
    return min(value, MAX_TOKENS_CAP)


class Recorder:
    """Appends one JSON line per received request; flushed at once (the process may be SIGKILLed)."""

    def __init__(self, path: Path, planted: Iterable[str]) -> None:
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._planted = tuple(p for p in planted if p)

    def record(self, path: str, texts: list[str], raw: str, unread: bool = False) -> None:
        joined = "\n".join(texts) if texts else raw
        line = {"t": time.time(), "path": path, "tags": sorted(set(TAG.findall(joined))),
                "planted": sorted({p for p in self._planted if p in joined}), "chars": len(joined),
                "unread": unread}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None) -> dict[str, Any]:
    if chat:
        delta = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(rid: str, model: str, chat: bool, n: int, prompt_tokens: int, token_s: float,
                  include_usage: bool) -> AsyncIterator[str]:
    for i in range(n):
        await asyncio.sleep(token_s)
        yield f"data: {json.dumps(_chunk(rid, model, chat, WORDS[i % len(WORDS)] + ' ', None))}\n\n"
    yield f"data: {json.dumps(_chunk(rid, model, chat, None if chat else '', 'length'))}\n\n"
    if include_usage:
        usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": int(time.time()), "model": model, "choices": [], "usage": _usage(prompt_tokens, n)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _whole(rid: str, model: str, chat: bool, n: int, prompt_tokens: int) -> dict[str, Any]:
    text = "".join(WORDS[i % len(WORDS)] + " " for i in range(n))
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "length"}
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(prompt_tokens, n)}


def make_app(recorder: Recorder, token_s: float, max_context_tokens: int, model_name: str) -> Starlette:
    async def completions(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            raw = (await request.body()).decode("utf-8", "replace")
        except ClientDisconnect:
            # NOTE: the gateway cancelled before this app read the body (its client left); the bytes
            # are gone from here, so the line says so rather than claiming a clean body.
            recorder.record(request.url.path, [], "", unread=True)
            return Response(status_code=499)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            recorder.record(request.url.path, [], raw)
            return error(400, "The body is not valid JSON.", code="invalid_json")
        if not isinstance(body, dict):
            recorder.record(request.url.path, [], raw)
            return error(400, "The body must be a JSON object.")
        try:
            texts = body_texts(body, chat)
        except BadRequest as e:
            recorder.record(request.url.path, [], raw)
            return error(400, str(e), e.param, e.code)
        recorder.record(request.url.path, texts, raw)
        try:
            check_sampling(body)
            n = max_tokens(body)
        except BadRequest as e:
            return error(400, str(e), e.param, e.code)
        prompt_tokens = max(1, sum(len(t) for t in texts) // CHARS_PER_TOKEN)
        if prompt_tokens + n > max_context_tokens:
            return error(400, f"This model's maximum context length is {max_context_tokens} tokens; the "
                              f"request asks for about {prompt_tokens + n}.", "messages" if chat else "prompt",
                         "context_length_exceeded")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        model = str(body.get("model") or model_name)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            return StreamingResponse(_stream(rid, model, chat, n, prompt_tokens, token_s, include_usage),
                                     media_type="text/event-stream")
        await asyncio.sleep(token_s * n)
        return JSONResponse(_whole(rid, model, chat, n, prompt_tokens))

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "soak-cloud"}]})

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            recorder.close()

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     lifespan=lifespan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True, help="JSONL file, appended to")
    parser.add_argument("--planted", type=Path, default=None, help="JSON list of PII strings to look for")
    parser.add_argument("--token-ms", type=float, default=30.0, help="milliseconds between streamed tokens")
    parser.add_argument("--max-context-tokens", type=int, default=8192)
    parser.add_argument("--model-name", default="cloud-model")
    args = parser.parse_args()
    planted = json.loads(args.planted.read_text(encoding="utf-8")) if args.planted else []
    if not isinstance(planted, list) or not all(isinstance(p, str) for p in planted):
        print(f"error: {args.planted}: expected a JSON list of strings", file=sys.stderr)
        return 2
    app = make_app(Recorder(args.record, planted), args.token_ms / 1000, args.max_context_tokens, args.model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
