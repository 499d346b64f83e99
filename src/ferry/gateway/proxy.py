"""One inference request through the gateway:

    stages (key -> body -> model allowed? -> data class -> RPM/TPM/budget admission; stages.py)
        -> reserve a deployment (policy, overflow, queue) -> upstream -> failover before the first token
        -> stream through -> ledger row + metrics

The upstream request lives exactly as long as the client's: a disconnect cancels it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response

from ferry.disconnect import ClientDisconnected, race_disconnect
from ferry.gateway.backends import Backend, UpstreamError
from ferry.gateway.config import ModelRoute
from ferry.gateway.data_class import DataClassDecision
from ferry.gateway.ledger import CLIENT_CLOSED, Outcome, Progress, cost_usd
from ferry.gateway.limits import Estimate
from ferry.gateway.routing import NoRoute
from ferry.gateway.routing.router import Reservation
from ferry.gateway.stages import Refused, run_stages
from ferry.gateway.state import Gateway
from ferry.gateway.token_bounds import answer_bytes, delivered_tokens
from ferry.openai_errors import OpenAIError
from ferry.sse import DONE, SSEError, SSEResponse, aiter_sse_data, sse_event

log = logging.getLogger("ferry.gateway")
# endpoints an OpenAI-compatible upstream may lack: its 404 moves the request to another deployment
_OPTIONAL_ENDPOINTS = ("embeddings",)


@dataclass
class _Context:
    """One admitted request's attempts; ``finish`` closes its ledger row and counts its metrics."""

    gw: Gateway
    decision: DataClassDecision
    stream: bool
    row_id: int
    t0: float  # monotonic start
    reserve: Estimate = field(default_factory=Estimate)
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    not_served: list[str] = field(default_factory=list)  # deployments that answered 404 for the endpoint
    backend_state: str = "up"  # what health.BackendStates said of the backend when it was chosen

    async def finish(self, outcome: Outcome) -> None:
        reason = outcome.reason
        if reason is None and (self.failures or self.not_served):
            reason = "failed over: " + " | ".join(self.failures + self.not_served)
        outcome = replace(outcome, attempts=self.attempts, latency_s=time.monotonic() - self.t0, reason=reason)
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


def _is_error_event(event: Any) -> bool:
    return isinstance(event, dict) and "error" in event and not event.get("choices")


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


def _event(payload: str) -> Any:
    """A data payload's JSON; None for ``[DONE]`` and for what is not JSON."""
    if payload == DONE:
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return None


@dataclass
class _Stream:
    """An upstream stream that has produced its first token (or ended) and has not reached the client."""

    response: httpx.Response
    events: AsyncGenerator[str, None]  # its data payloads, continued where the first token was read
    buffered: list[str]  # payloads read so far
    usage: tuple[int, int] | None
    done: bool


async def _open_stream(backend_name: str, resp: httpx.Response) -> _Stream:
    """Read events until one carries a token; any failure before that is an ``UpstreamError``.

    On any way out but success (failure, timeout, the client gone) the upstream response is closed,
    so the upstream stops generating at once instead of when the garbage collector finds it.
    """
    events = aiter_sse_data(resp)
    try:
        return await _read_first_token(backend_name, resp, events)
    except BaseException:
        with anyio.CancelScope(shield=True):
            try:
                await events.aclose()
            finally:
                await resp.aclose()
        raise


async def _read_first_token(backend_name: str, resp: httpx.Response,
                            events: AsyncGenerator[str, None]) -> _Stream:
    buffered: list[str] = []
    usage = None
    try:
        async for payload in events:
            buffered.append(payload)
            if payload == DONE:
                return _Stream(resp, events, buffered, usage, True)
            try:
                event = json.loads(payload)
            except json.JSONDecodeError as e:
                raise UpstreamError(backend_name, "protocol", f"bad stream chunk: {payload[:100]!r}") from e
            usage = _usage(event) or usage
            if _is_error_event(event):
                raise UpstreamError(backend_name, "status", f"error event: {payload[:300]}")
            if isinstance(event, dict) and _carries_token(event):
                return _Stream(resp, events, buffered, usage, False)
    except SSEError as e:  # NOTE: before httpx.HTTPError, of which it is one
        raise UpstreamError(backend_name, "protocol", f"not an event stream: {e}") from e
    except httpx.TimeoutException as e:
        raise UpstreamError(backend_name, "timeout", "no token before the timeout") from e
    except httpx.HTTPError as e:
        raise UpstreamError(backend_name, "protocol", str(e) or type(e).__name__) from e
    raise UpstreamError(backend_name, "protocol", "stream ended before any token")


@dataclass
class _StreamEnd:
    """How a stream to the client ended, settled as it goes and written to the ledger once."""

    usage: tuple[int, int] | None
    status: int = CLIENT_CLOSED  # until the stream says otherwise, the client left
    reason: str | None = "client disconnected mid-stream"
    closed: bool = False
    delivered: int = 0  # completion tokens that reached the client, counted from the chunks


class InferenceHandler:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, request: Request, endpoint: str) -> Response:
        t0 = time.monotonic()
        admitted = await run_stages(self.gw, request, endpoint)
        if isinstance(admitted, Refused):
            return await self._reject(admitted)
        ctx = _Context(self.gw, admitted.decision, admitted.stream, admitted.row_id, t0, admitted.reserve)
        try:
            return await race_disconnect(request, self._dispatch(ctx, admitted.route, admitted.body, endpoint))
        except ClientDisconnected:
            with anyio.CancelScope(shield=True):
                await ctx.finish(Outcome(CLIENT_CLOSED, reason="client disconnected before the response"))
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:  # a bug of ours or an upstream answer we did not foresee: 500, row closed
            log.exception("gateway failed request (ledger row %d)", ctx.row_id)
            with anyio.CancelScope(shield=True):
                await ctx.finish(Outcome(500, reason=f"gateway error: {type(e).__name__}: {e}"))
            return OpenAIError(500, f"The gateway failed this request: {type(e).__name__}",
                               code="gateway_error").response()

    async def _reject(self, refused: Refused) -> Response:
        """The one place a request refused by a stage is counted, written to the ledger and answered."""
        rejection = refused.rejection
        self.gw.metrics.blocked.labels(rejection.blocked).inc()
        if rejection.write_row:
            row = replace(refused.row, status=rejection.error.status_code, reason=rejection.reason)
            await self.gw.db(self.gw.ledger.record, row)
        return rejection.error.response()

    async def _dispatch(self, ctx: _Context, route: ModelRoute, body: dict[str, Any], endpoint: str) -> Response:
        gw = self.gw
        deadline = time.monotonic() + gw.config.routing.queue_timeout
        # NOTE: a deployment whose kind has no such endpoint (anthropic: no embeddings) is never tried
        exclude = {i for i, d in enumerate(route.deployments) if not gw.config.backend(d.backend).serves(endpoint)}
        while True:
            try:
                res = await gw.router.reserve(route, ctx.decision.locations, deadline, frozenset(exclude))
            except NoRoute as e:
                return await self._no_route(ctx, e, endpoint)
            ctx.attempts += 1
            backend = res.candidate.backend
            ctx.backend_state = gw.states.state(backend)
            released = False
            try:
                upstream = dict(body, model=res.candidate.deployment.model)
                if ctx.stream:
                    upstream["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
                resp = await backend.send(endpoint, upstream)
                if resp.status_code == 404 and endpoint in _OPTIONAL_ENDPOINTS:
                    # NOTE: an upstream without the endpoint (ferry serve has no embeddings) or
                    # without the model: it answered, so its circuit stays closed, and another
                    # deployment may serve it. Not counted against routing.retries: deployments are few.
                    released = True
                    detail = await self._read_error(backend, resp)
                    self._answered(backend)
                    ctx.not_served.append(f"{backend.name}: HTTP 404: {detail}")
                    exclude.add(res.candidate.index)
                    continue
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
                self._answered(backend)
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

    async def _unserved(self, ctx: _Context, blocked: str, error: OpenAIError, reason: str) -> Response:
        """An admitted request no backend served: counted as blocked, its pending row closed."""
        self.gw.metrics.blocked.labels(blocked).inc()
        await ctx.finish(Outcome(error.status_code, reason=reason))
        return error.response()

    async def _read_error(self, backend: Backend, resp: httpx.Response) -> str:
        """An error answer's first bytes; the response closed and the backend's slot released."""
        try:
            raw = await resp.aread()
        except httpx.HTTPError as e:
            raw = str(e).encode()
        finally:
            await resp.aclose()
            self.gw.router.release(backend)
        return raw.decode(errors="replace")[:300]

    async def _no_route(self, ctx: _Context, e: NoRoute, endpoint: str) -> Response:
        if e.code == "exhausted" and ctx.failures:
            return await self._upstream_failed(ctx)
        if e.code == "exhausted" and ctx.not_served:
            message = (f"no deployment this request may use serves /v1/{endpoint}: " + " | ".join(ctx.not_served))
            return await self._unserved(ctx, "not_served", OpenAIError(404, message, code="unsupported_endpoint"),
                                        message)
        if e.code == "exhausted" and ctx.attempts == 0:
            # NOTE: every deployment the data class allows is of a kind without the endpoint
            e = NoRoute(f"no deployment of this model in {' or '.join(ctx.decision.locations)}, the only "
                        f"location(s) this request's data class allows, serves /v1/{endpoint}", "no_allowed_deployment")
        message = f"{e.reason} (data class {ctx.decision.name!r}" + (
            f", PII found: {', '.join(ctx.decision.pii)})" if ctx.decision.pii else ")")
        return await self._unserved(ctx, e.code, OpenAIError(503, message, code=e.code), f"{e.code}: {message}")

    async def _upstream_failed(self, ctx: _Context) -> Response:
        message = "every attempt failed: " + " | ".join(ctx.failures + ctx.not_served)
        return await self._unserved(ctx, "upstream_failed", OpenAIError(502, message, code="upstream_failed"),
                                    message)

    def _answered(self, backend: Backend) -> None:
        """The backend answered a request: its failure streak ends and it is known up."""
        backend.breaker.record_success()
        self.gw.states.answered(backend.name)

    def _headers(self, ctx: _Context, res: Reservation) -> dict[str, str]:
        # NOTE: x-ferry-backend-state "unknown": routed before the backend's first health check
        # answered, because no backend known up could take the request (health.PreferKnownUp).
        return {"x-ferry-backend": res.candidate.backend.name, "x-ferry-location": res.candidate.location,
                "x-ferry-data-class": ctx.decision.name, "x-ferry-overflow": "1" if res.overflow else "0",
                "x-ferry-backend-state": ctx.backend_state}

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
            error = OpenAIError(resp.status_code, f"upstream {backend.name}: {e}", type="upstream_error")
            raw = json.dumps(error.body()).encode()
        finally:
            await resp.aclose()
            self.gw.router.release(backend)
        self._answered(backend)  # it answered: the request was wrong, not the backend
        await ctx.finish(self._outcome(res, resp.status_code, None, reason=raw.decode(errors="replace")[:500]))
        return Response(raw, status_code=resp.status_code, media_type="application/json",
                        headers=self._headers(ctx, res))

    async def _complete(self, ctx: _Context, res: Reservation, raw: bytes) -> Response:
        try:
            answer = json.loads(raw)
        except json.JSONDecodeError:
            answer = None
        usage = _usage(answer)
        billed = usage or (ctx.reserve.prompt_tokens, min(ctx.reserve.completion_tokens, answer_bytes(answer)))
        await ctx.finish(self._outcome(res, 200, billed, reason=None if usage else "upstream reported no usage"))
        return Response(raw, status_code=200, media_type="application/json", headers=self._headers(ctx, res))

    def _stream_response(self, ctx: _Context, res: Reservation, opened: _Stream, body: dict[str, Any]) -> Response:
        gw = self.gw
        backend = res.candidate.backend
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ttft = time.monotonic() - ctx.t0
        end = _StreamEnd(opened.usage)
        cand = res.candidate

        def billed() -> tuple[int, int] | None:
            """The upstream's usage; without it, what reached the client (the prompt as reserved:
            exact where the backend counted it, else its upper bound)."""
            if end.usage is not None:
                return end.usage
            return (ctx.reserve.prompt_tokens, end.delivered) if end.delivered else None

        def delivered(event: Any) -> None:
            """Count a chunk that reached the client; the keeper writes the count to the row."""
            if (n := delivered_tokens(event)) == 0:
                return
            end.delivered += n
            p, c = billed() or (0, 0)
            gw.inflight.report(ctx.row_id, Progress(
                cand.backend.name, cand.deployment.model, cand.location, res.overflow, p, c,
                cost_usd(p, c, cand.input_per_mtok, cand.output_per_mtok)))

        def frame(payload: str, event: Any) -> str | None:
            """What the client gets for one upstream event; None drops it."""
            # NOTE: we asked upstream for usage so the ledger is exact; a client that did not ask
            # gets the stream it would have had without it.
            if not wants_usage and isinstance(event, dict) and not event.get("choices") and event.get("usage"):
                return None
            return sse_event(payload)

        async def close() -> None:
            """Idempotent: release the upstream and the reservation, write the ledger row."""
            if end.closed:
                return
            end.closed = True
            try:
                try:
                    await opened.events.aclose()
                finally:
                    await opened.response.aclose()
            finally:
                # NOTE: a failing close must not leak the backend's slot or leave the row pending.
                gw.router.release(backend)
                gw.inflight.discard(ctx.row_id)
                await ctx.finish(self._outcome(res, end.status, billed(), ttft_s=ttft, reason=end.reason))

        error_event: str | None = None  # an upstream error event passed through mid-stream
        settled = False

        def settle() -> None:
            """The upstream stream ended: decide its outcome once.

            NOTE: called before ``[DONE]`` is yielded, not after: a client that hangs up as soon as it
            reads ``[DONE]`` cancels this generator at that yield, and a complete answer must not be
            recorded as a client disconnect.
            """
            nonlocal settled
            if settled:
                return
            settled = True
            if error_event is not None:
                # NOTE: the client saw the error event, so it is not a 200 even though the stream ended cleanly.
                end.status = 502
                end.reason = f"upstream {backend.name} sent an error mid-stream: {error_event[:300]}"
                backend.breaker.record_failure()
            else:
                end.status = 200
                end.reason = None if end.usage else "upstream reported no usage"
                self._answered(backend)

        async def events() -> AsyncIterator[str]:
            nonlocal error_event
            try:
                for payload in opened.buffered:
                    event = _event(payload)
                    if payload == DONE:
                        settle()
                    if (out := frame(payload, event)) is not None:
                        yield out
                        delivered(event)
                if not opened.done:
                    async for payload in opened.events:
                        event = _event(payload)
                        end.usage = _usage(event) or end.usage
                        if _is_error_event(event):
                            error_event = error_event or payload
                        if payload == DONE:
                            settle()
                        if (out := frame(payload, event)) is not None:
                            yield out
                            delivered(event)
                settle()
            except httpx.HTTPError as e:
                # NOTE: tokens already reached the client, so failing over would splice two answers.
                end.status = 502
                end.reason = f"upstream {backend.name} failed mid-stream: {e or type(e).__name__}"
                backend.breaker.record_failure()
                error = OpenAIError(502, end.reason, code="upstream_failed")
                # NOTE: serialized as before (json.dumps' default spacing), so the event's bytes stay the same.
                yield sse_event(json.dumps(error.body()))
            finally:
                with anyio.CancelScope(shield=True):
                    await close()

        return SSEResponse(events(), on_close=close, headers=self._headers(ctx, res))
