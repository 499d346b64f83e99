"""One streaming request to an OpenAI-compatible server, timed token by token.

Measures, per request: TTFT (send -> first chunk carrying text), every inter-token gap (between successive
text chunks), E2E (send -> end of stream) and output tokens. Output tokens come from the usage chunk when
the server sends one (``stream_options.include_usage``), else from a tokenizer over the streamed text,
else (no tokenizer) from the number of text chunks; ``token_source`` says which.

Failures never raise: they come back as a result with ``error_kind`` set, so a run always finishes.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from ferry.bench.workload import RequestSpec, TokenCounter
from ferry.sse import DONE, SSEError, aiter_sse_data

_ERROR_BODY_LIMIT = 2000

# error_kind values (see docs/bench.md)
CONNECT_ERROR = "connect_error"  # nothing listening / refused / DNS
DISCONNECTED = "disconnected"  # the server closed the connection before answering
STREAM_CUT = "stream_cut"  # the stream ended or broke before it finished
TIMEOUT = "timeout"  # no answer within --timeout
BAD_RESPONSE = "bad_response"  # the stream was not OpenAI-shaped SSE/JSON
STREAM_ERROR = "stream_error"  # the server sent an error object inside the stream


@dataclass(frozen=True)
class Target:
    """One server under test."""

    base_url: str  # ends in /v1
    label: str
    model: str
    endpoint: str = "chat"  # "chat" | "completions"
    api_key: str | None = None

    @property
    def request_url(self) -> str:
        return self.base_url + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class SendOptions:
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int | None = None
    request_usage: bool = True  # ask for the usage chunk (stream_options.include_usage)
    timeout_s: float = 300.0  # the whole request, send to last byte

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    start: float  # time.perf_counter() when the request was sent
    e2e: float | None = None  # seconds
    ttft: float | None = None  # seconds; None when no text came back
    itls: tuple[float, ...] = ()  # seconds between successive text chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str | None = None  # "usage" | "tokenizer" | "chunks"
    finish_reason: str | None = None
    error_kind: str | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (output_tokens - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def build_body(target: Target, spec: RequestSpec, opts: SendOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, **spec.body(target.endpoint), "max_tokens": spec.max_tokens,
                            "temperature": opts.temperature, "stream": True}
    if opts.request_usage:
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True  # NOTE: a vLLM extension that ferry, vLLM and llama.cpp accept
    if opts.seed is not None:
        body["seed"] = opts.seed
    return body


@dataclass
class _Stream:
    """Mutable state of one stream while it is read."""

    start: float
    ttft: float | None = None
    last: float | None = None
    itls: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False
    got_headers: bool = False

    def on_text(self, text: str, now: float) -> None:
        if self.last is None:
            self.ttft = now - self.start
        else:
            self.itls.append(now - self.last)
        self.last = now
        self.pieces.append(text)


def _chunk_text(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "completions":
        parts = [choice.get("text")]
    else:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise ValueError("delta is not an object")
        # NOTE: reasoning models stream thoughts in reasoning_content; they are output tokens too.
        parts = [delta.get("content"), delta.get("reasoning_content")]
    if any(p is not None and not isinstance(p, str) for p in parts):
        raise ValueError("streamed text is not a string")
    return "".join(p for p in parts if p)


def _handle_event(st: _Stream, data: str, endpoint: str) -> str | None:
    """Apply one SSE ``data`` payload; returns an error message for an in-stream error object."""
    if data.strip() == DONE:
        st.done = True
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("SSE payload is not a JSON object")
    if "error" in obj:
        err = obj["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError("choices is not a list of objects")
    for choice in choices:
        text = _chunk_text(choice, endpoint)
        if text:
            st.on_text(text, time.perf_counter())
        if choice.get("finish_reason"):
            st.finish_reason = choice["finish_reason"]
    if isinstance(obj.get("usage"), dict):
        st.usage = obj["usage"]
    return None


def _error_message(status: int, raw: bytes) -> str:
    """The OpenAI error body's message when there is one, else the start of the raw body."""
    text = raw[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"HTTP {status}: {err['message']}"
    if isinstance(err, str):
        return f"HTTP {status}: {err}"
    return f"HTTP {status}: {text.strip()[:200] or '(empty body)'}"


async def _stream(client: httpx.AsyncClient, target: Target, body: dict[str, Any], st: _Stream) -> RequestResult | None:
    """Reads the response into ``st``; returns a failed result for HTTP/in-stream errors, else None."""
    async with client.stream("POST", target.request_url, json=body, headers=target.headers()) as resp:
        st.got_headers = True
        if resp.status_code != 200:
            raw = await resp.aread()
            return RequestResult(ok=False, start=st.start, e2e=time.perf_counter() - st.start,
                                 error_kind=f"http_{resp.status_code}",
                                 error=_error_message(resp.status_code, raw))
        content_type = resp.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raw = await resp.aread()
            return RequestResult(ok=False, start=st.start, e2e=time.perf_counter() - st.start,
                                 error_kind=BAD_RESPONSE,
                                 error=f"expected an SSE stream, got {content_type or 'no content-type'}: "
                                       f"{raw[:120].decode('utf-8', 'replace')}")
        async with aclosing(aiter_sse_data(resp)) as payloads:
            async for data in payloads:
                message = _handle_event(st, data, target.endpoint)
                if message is not None:
                    return RequestResult(ok=False, start=st.start, e2e=time.perf_counter() - st.start,
                                         error_kind=STREAM_ERROR, error=message)
                if st.done:
                    break
    return None


def _count_tokens(st: _Stream, spec: RequestSpec, tokenizer: TokenCounter | None) -> tuple[int, int | None, str]:
    usage = st.usage or {}
    prompt_tokens = usage.get("prompt_tokens")
    if isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"], prompt_tokens, "usage"
    if tokenizer is not None:
        # NOTE: the prompt count misses the chat template's few tokens; output counts are exact re-encodes.
        if prompt_tokens is None:
            prompt_tokens = len(tokenizer.encode(spec.text()))
        return len(tokenizer.encode("".join(st.pieces))), prompt_tokens, "tokenizer"
    return len(st.pieces), prompt_tokens, "chunks"


async def send_request(client: httpx.AsyncClient, target: Target, spec: RequestSpec, opts: SendOptions,
                       tokenizer: TokenCounter | None = None) -> RequestResult:
    """Sends one streaming request and times it; never raises for network or server faults."""
    body = build_body(target, spec, opts)
    st = _Stream(start=time.perf_counter())
    try:
        failed = await asyncio.wait_for(_stream(client, target, body, st), timeout=opts.timeout_s)
    except asyncio.TimeoutError:
        return _failure(st, TIMEOUT, f"no complete answer within {opts.timeout_s:g}s")
    except httpx.TimeoutException as e:
        return _failure(st, TIMEOUT, f"{type(e).__name__}: {e}")
    except httpx.ConnectError as e:
        return _failure(st, CONNECT_ERROR, f"cannot connect to {target.base_url}: {e}")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if st.got_headers:
            return _failure(st, STREAM_CUT, f"the stream broke after {len(st.pieces)} text chunks ({detail})")
        return _failure(st, DISCONNECTED, f"the server closed the connection before answering ({detail})")
    except (ValueError, SSEError) as e:  # json.JSONDecodeError included
        # NOTE: SSEError is an httpx.HTTPError, so it must be caught before the catch-all below.
        return _failure(st, BAD_RESPONSE, f"not an OpenAI stream: {type(e).__name__}: {e}")
    except httpx.HTTPError as e:
        return _failure(st, type(e).__name__, str(e))
    if failed is not None:
        return failed
    end = time.perf_counter()
    if not st.done and st.finish_reason is None:
        return _failure(st, STREAM_CUT, "the stream ended without a finish_reason or [DONE]")
    output_tokens, prompt_tokens, source = _count_tokens(st, spec, tokenizer)
    return RequestResult(ok=True, start=st.start, e2e=end - st.start, ttft=st.ttft, itls=tuple(st.itls),
                         output_tokens=output_tokens, prompt_tokens=prompt_tokens, token_source=source,
                         finish_reason=st.finish_reason)


def _failure(st: _Stream, kind: str, message: str) -> RequestResult:
    return RequestResult(ok=False, start=st.start, e2e=time.perf_counter() - st.start,
                         ttft=st.ttft, itls=tuple(st.itls), error_kind=kind, error=message)


async def discover_model(client: httpx.AsyncClient, base_url: str, api_key: str | None,
                         timeout_s: float = 10.0) -> str | None:
    """The first model id in ``GET /v1/models``, or None when the server does not answer it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await client.get(base_url + "/models", headers=headers, timeout=timeout_s)
        body = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None  # NOTE: the run still goes on; its requests will report what is wrong
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
        return data[0]["id"]
    return None


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/chat/completions`` -> ``http://host:8000/v1``."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    u = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    return u if u.endswith("/v1") else u + "/v1"
