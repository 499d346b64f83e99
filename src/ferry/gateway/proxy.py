"""One inference request through the gateway:

    key -> model allowed? -> data class (key default, header, PII) -> RPM/TPM/budget admission
        -> reserve a deployment (policy, overflow, queue) -> upstream -> failover before the first token
        -> stream through -> ledger row + metrics

The upstream request lives exactly as long as the client's: a disconnect cancels it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ferry.disconnect import ClientDisconnected, race_disconnect
from ferry.gateway.backends.base import UpstreamError
from ferry.gateway.data_class import HEADER, DataClassDecision, UnknownDataClass
from ferry.gateway.errors import error_response
from ferry.gateway.keys import KeyRecord
from ferry.gateway.ledger import Outcome, cost_usd
from ferry.gateway.limits import Refusal, dearest_prices, estimate
from ferry.gateway.routing import NoRoute
from ferry.gateway.routing.router import Reservation
from ferry.gateway.state import Gateway

log = logging.getLogger("ferry.gateway")
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; only ever written to the ledger


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


@dataclass
class _Context:
    gw: Gateway
    key: KeyRecord | None
    model: str
    stream: bool
    decision: DataClassDecision
    row_id: int
    t0: float  # monotonic start
    attempts: int = 0
    failures: list[str] = field(default_factory=list)

    async def finish(self, outcome: Outcome) -> None:
        outcome.attempts = self.attempts
        outcome.latency_s = time.monotonic() - self.t0
        if outcome.reason is None and self.failures:
            outcome.reason = "failed over: " + " | ".join(self.failures)
        m = self.gw.metrics
        m.requests.labels(outcome.backend or "", outcome.location or "", self.decision.name,
                          str(outcome.status)).inc()
        if outcome.backend:
            m.cost.labels(outcome.backend, outcome.location or "").inc(outcome.cost_usd)
            m.prompt_tokens.labels(outcome.backend).inc(outcome.prompt_tokens)
            m.completion_tokens.labels(outcome.backend).inc(outcome.completion_tokens)
            m.latency.labels(outcome.backend).observe(outcome.latency_s)
            if outcome.ttft_s is not None:
                m.ttft.labels(outcome.backend).observe(outcome.ttft_s)
        if outcome.overflow and outcome.status == 200:
            m.overflow.inc()
        await self.gw.db(self.gw.ledger.close, self.row_id, outcome)


def _usage(obj: Any) -> tuple[int, int] | None:
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None
    p, c = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (p, c)):
        return None  # NOTE: an upstream's malformed usage must not break the answer; the ledger says "no usage"
    return int(p), int(c)


def _carries_token(event: dict[str, Any]) -> bool:
    """Whether a stream chunk shows the client anything of the answer (text, a tool call, an end)."""
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("function_call")):
            return True
    return False


@dataclass
class _Stream:
    """An upstream stream that has produced its first token (or ended) and has not reached the client."""

    response: httpx.Response
    lines: AsyncIterator[str]
    buffered: list[str]  # SSE data payloads read so far
    usage: tuple[int, int] | None
    done: bool


async def _open_stream(backend_name: str, resp: httpx.Response) -> _Stream:
    """Read events until one carries a token; any failure before that is an ``UpstreamError``.

    On any way out but success (failure, timeout, the client gone) the upstream response is closed,
    so the upstream stops generating at once instead of when the garbage collector finds it.
    """
    try:
        return await _read_first_token(backend_name, resp)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await resp.aclose()
        raise


async def _read_first_token(backend_name: str, resp: httpx.Response) -> _Stream:
    lines = resp.aiter_lines()
    buffered: list[str] = []
    usage = None
    try:
        async for line in lines:
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            buffered.append(payload)
            if payload == "[DONE]":
                return _Stream(resp, lines, buffered, usage, True)
            try:
                event = json.loads(payload)
            except json.JSONDecodeError as e:
                raise UpstreamError(backend_name, "protocol", f"bad stream chunk: {payload[:100]!r}") from e
            usage = _usage(event) or usage
            if isinstance(event, dict) and "error" in event and not event.get("choices"):
                raise UpstreamError(backend_name, "status", f"error event: {payload[:300]}")
            if isinstance(event, dict) and _carries_token(event):
                return _Stream(resp, lines, buffered, usage, False)
    except httpx.TimeoutException as e:
        raise UpstreamError(backend_name, "timeout", "no token before the timeout") from e
    except httpx.HTTPError as e:
        raise UpstreamError(backend_name, "protocol", str(e) or type(e).__name__) from e
    raise UpstreamError(backend_name, "protocol", "stream ended before any token")


class _ClosingStreamingResponse(StreamingResponse):
    """Always runs ``on_close``, whichever way the ASGI server reports a disconnect, even when the
    client went away before the first chunk (a generator that never started has no ``finally`` to run)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


class InferenceHandler:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _blocked(self, reason: str) -> None:
        self.gw.metrics.blocked.labels(reason).inc()

    async def __call__(self, request: Request, endpoint: str) -> Response:
        gw = self.gw
        t0 = time.monotonic()
        secret = bearer(request)
        key: KeyRecord | None = None
        if not gw.is_master(secret):
            key = await gw.db(gw.keys.lookup, secret) if secret else None
            if key is None:
                self._blocked("auth")
                await gw.db(lambda: gw.ledger.record(status=401, reason="missing or invalid API key"))
                return error_response(401, "Incorrect or missing API key.", "invalid_request_error",
                                      "invalid_api_key")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._blocked("bad_request")
            await gw.db(lambda: gw.ledger.record(key_id=key.id if key else "master", key_name=key.name if key else
                                                 "master", team=key.team if key else None, status=400,
                                                 reason="body is not a JSON object"))
            return error_response(400, "The body must be a JSON object.", "invalid_request_error")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            self._blocked("bad_request")
            await gw.db(lambda: gw.ledger.record(key_id=key.id if key else "master", key_name=key.name if key else
                                                 "master", team=key.team if key else None, status=400,
                                                 reason="stream_options is not an object"))
            return error_response(400, "stream_options must be an object.", "invalid_request_error",
                                  "invalid_value", "stream_options")
        model = body.get("model")
        base_row: dict[str, Any] = {"key_id": key.id if key else "master", "key_name": key.name if key else "master",
                                    "team": key.team if key else None, "model": model if isinstance(model, str) else None,
                                    "stream": bool(body.get("stream"))}
        if not isinstance(model, str) or gw.config.model(model) is None:
            self._blocked("model_not_found")
            await gw.db(lambda: gw.ledger.record(**base_row, status=404, reason="unknown model"))
            return error_response(404, f"The model {model!r} does not exist.", "invalid_request_error",
                                  "model_not_found", "model")
        route = gw.config.model(model)
        assert route is not None
        if key is not None and not key.allows(model):
            self._blocked("model_not_allowed")
            await gw.db(lambda: gw.ledger.record(**base_row, status=403, reason="model not allowed for key"))
            return error_response(403, f"Key {key.name!r} may not use model {model!r}.", "permission_error",
                                  "model_not_allowed", "model")
        try:
            decision = gw.data_classes.decide(key.data_class if key else None, request.headers.get(HEADER), body)
        except UnknownDataClass as e:
            self._blocked("bad_request")
            reason = f"{HEADER}: {e}"
            await gw.db(lambda: gw.ledger.record(**base_row, status=400, reason=reason))
            return error_response(400, reason, "invalid_request_error", "unknown_data_class")
        base_row.update(data_class=decision.name, pii=bool(decision.pii), pii_kinds=",".join(decision.pii) or None)
        # NOTE: the backend is chosen after admission, so the reservation is priced at the dearest
        # deployment this request's data class allows.
        reserve = estimate(body, endpoint, *dearest_prices(gw.config, route, decision.locations))
        admitted = await gw.db(gw.limits.admit, key, base_row, reserve)
        if isinstance(admitted, Refusal):
            self._blocked(admitted.reason)
            if admitted.retry_after is not None:
                return error_response(429, admitted.message, "rate_limit_error", "rate_limit_exceeded",
                                      headers={"Retry-After": str(admitted.retry_after)})
            return error_response(429, admitted.message, "insufficient_quota", "budget_exceeded")
        ctx = _Context(gw, key, model, bool(body.get("stream")), decision, admitted.row_id, t0)
        try:
            return await race_disconnect(request, self._dispatch(ctx, route, body, endpoint))
        except ClientDisconnected:
            with anyio.CancelScope(shield=True):
                await ctx.finish(Outcome(CLIENT_CLOSED, reason="client disconnected before the response"))
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:  # a bug of ours or an upstream answer we did not foresee: 500, row closed
            log.exception("gateway failed request (ledger row %d)", ctx.row_id)
            with anyio.CancelScope(shield=True):
                await ctx.finish(Outcome(500, reason=f"gateway error: {type(e).__name__}: {e}"))
            return error_response(500, f"The gateway failed this request: {type(e).__name__}", "server_error",
                                  "gateway_error")

    async def _dispatch(self, ctx: _Context, route: Any, body: dict[str, Any], endpoint: str) -> Response:
        gw = self.gw
        deadline = time.monotonic() + gw.config.routing.queue_timeout
        exclude: set[int] = set()
        while True:
            try:
                res = await gw.router.reserve(route, ctx.decision.locations, deadline, frozenset(exclude))
            except NoRoute as e:
                return await self._no_route(ctx, e)
            ctx.attempts += 1
            backend = res.candidate.backend
            released = False
            try:
                upstream = dict(body, model=res.candidate.deployment.model)
                if ctx.stream:
                    upstream["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
                resp = await backend.send(endpoint, upstream)
                if resp.status_code != 200:
                    released = True
                    return await self._passthrough_error(ctx, res, resp)
                if ctx.stream:
                    opened = await _open_stream(backend.name, resp)
                    released = True  # NOTE: from here on the stream generator owns the reservation
                    return self._stream_response(ctx, res, opened, body)
                try:
                    raw = await resp.aread()
                except httpx.TimeoutException as e:
                    raise UpstreamError(backend.name, "timeout", "timed out reading the body") from e
                except httpx.HTTPError as e:
                    raise UpstreamError(backend.name, "protocol", str(e) or type(e).__name__) from e
                finally:
                    await resp.aclose()
                released = True
                gw.router.release(backend)
                backend.breaker.record_success()
                return await self._complete(ctx, res, raw)
            except UpstreamError as e:
                released = True
                gw.router.release(backend)
                if backend.breaker.record_failure():
                    log.warning("backend %s is out after %d failures: %s", backend.name, backend.breaker.failures, e)
                gw.metrics.failovers.labels(backend.name).inc()
                ctx.failures.append(str(e))
                exclude.add(res.candidate.index)
                if ctx.attempts > gw.config.routing.retries:
                    return await self._upstream_failed(ctx)
            finally:
                if not released:  # cancelled (client gone) while the reservation was held
                    gw.router.release(backend)

    async def _no_route(self, ctx: _Context, e: NoRoute) -> Response:
        if e.code == "exhausted" and ctx.failures:
            return await self._upstream_failed(ctx)
        self._blocked(e.code)
        message = f"{e.reason} (data class {ctx.decision.name!r}" + (
            f", PII found: {', '.join(ctx.decision.pii)})" if ctx.decision.pii else ")")
        await ctx.finish(Outcome(503, reason=f"{e.code}: {message}"))
        return error_response(503, message, "service_unavailable", e.code)

    async def _upstream_failed(self, ctx: _Context) -> Response:
        self._blocked("upstream_failed")
        message = "every attempt failed: " + " | ".join(ctx.failures)
        await ctx.finish(Outcome(502, reason=message))
        return error_response(502, message, "upstream_error", "upstream_failed")

    def _headers(self, ctx: _Context, res: Reservation) -> dict[str, str]:
        return {"x-ferry-backend": res.candidate.backend.name, "x-ferry-location": res.candidate.location,
                "x-ferry-data-class": ctx.decision.name, "x-ferry-overflow": "1" if res.overflow else "0"}

    def _outcome(self, res: Reservation, status: int, usage: tuple[int, int] | None, **kw: Any) -> Outcome:
        p, c = usage or (0, 0)
        cand = res.candidate
        return Outcome(status, backend=cand.backend.name, upstream_model=cand.deployment.model,
                       location=cand.location, prompt_tokens=p, completion_tokens=c,
                       cost_usd=cost_usd(p, c, cand.input_per_mtok, cand.output_per_mtok),
                       overflow=res.overflow, **kw)

    async def _passthrough_error(self, ctx: _Context, res: Reservation, resp: httpx.Response) -> Response:
        """A 4xx from upstream: the request itself is wrong, so no other deployment would take it."""
        backend = res.candidate.backend
        try:
            raw = await resp.aread()
        except httpx.HTTPError as e:
            raw = json.dumps({"error": {"message": f"upstream {backend.name}: {e}", "type": "upstream_error",
                                        "param": None, "code": None}}).encode()
        finally:
            await resp.aclose()
            self.gw.router.release(backend)
        backend.breaker.record_success()  # it answered: the request was wrong, not the backend
        await ctx.finish(self._outcome(res, resp.status_code, None, reason=raw.decode(errors="replace")[:500]))
        return Response(raw, status_code=resp.status_code, media_type="application/json",
                        headers=self._headers(ctx, res))

    async def _complete(self, ctx: _Context, res: Reservation, raw: bytes) -> Response:
        try:
            usage = _usage(json.loads(raw))
        except json.JSONDecodeError:
            usage = None
        await ctx.finish(self._outcome(res, 200, usage, reason=None if usage else "upstream reported no usage"))
        return Response(raw, status_code=200, media_type="application/json", headers=self._headers(ctx, res))

    def _stream_response(self, ctx: _Context, res: Reservation, opened: _Stream, body: dict[str, Any]) -> Response:
        gw = self.gw
        backend = res.candidate.backend
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ttft = time.monotonic() - ctx.t0

        def frame(payload: str) -> bytes | None:
            """The bytes the client gets for one upstream event; None drops it."""
            if not wants_usage and payload != "[DONE]":
                # NOTE: we asked upstream for usage so the ledger is exact; a client that did not ask
                # gets the stream it would have had without it.
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    event = None
                if isinstance(event, dict) and not event.get("choices") and event.get("usage"):
                    return None
            return f"data: {payload}\n\n".encode()

        result: dict[str, Any] = {"status": CLIENT_CLOSED, "reason": "client disconnected mid-stream",
                                  "usage": opened.usage, "closed": False}

        async def close() -> None:
            """Idempotent: release the upstream and the reservation, write the ledger row."""
            if result["closed"]:
                return
            result["closed"] = True
            await opened.response.aclose()
            gw.router.release(backend)
            await ctx.finish(self._outcome(res, result["status"], result["usage"], ttft_s=ttft,
                                           reason=result["reason"]))

        async def events() -> AsyncIterator[bytes]:
            error_event: str | None = None  # an upstream error event passed through mid-stream
            try:
                for payload in opened.buffered:
                    out = frame(payload)
                    if out is not None:
                        yield out
                if not opened.done:
                    async for line in opened.lines:
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload != "[DONE]":
                            try:
                                event = json.loads(payload)
                            except json.JSONDecodeError:
                                event = None
                            result["usage"] = _usage(event) or result["usage"]
                            if isinstance(event, dict) and "error" in event and not event.get("choices"):
                                error_event = error_event or payload
                        out = frame(payload)
                        if out is not None:
                            yield out
                if error_event is not None:
                    # NOTE: the client saw the error event, so it is not a 200 even though the stream ended cleanly.
                    result["status"] = 502
                    result["reason"] = f"upstream {backend.name} sent an error mid-stream: {error_event[:300]}"
                    backend.breaker.record_failure()
                else:
                    result["status"] = 200
                    result["reason"] = None if result["usage"] else "upstream reported no usage"
                    backend.breaker.record_success()
            except httpx.HTTPError as e:
                # NOTE: tokens already reached the client, so failing over would splice two answers.
                result["status"] = 502
                result["reason"] = f"upstream {backend.name} failed mid-stream: {e or type(e).__name__}"
                backend.breaker.record_failure()
                err = {"error": {"message": result["reason"], "type": "upstream_error", "param": None,
                                 "code": "upstream_failed"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                with anyio.CancelScope(shield=True):
                    await close()

        return _ClosingStreamingResponse(events(), close, media_type="text/event-stream",
                                         headers={**self._headers(ctx, res), "Cache-Control": "no-cache"})
