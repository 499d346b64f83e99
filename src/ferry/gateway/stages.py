"""The stages a request passes before any backend sees it, in order:

    authenticate -> parse -> resolve model -> data class -> admit

Each stage returns its value or a ``Rejection``; ``run_stages`` chains them and hands back either an
``Admitted`` request (its pending ledger row reserving its estimated usage) or a ``Refused`` one,
which ``InferenceHandler`` records in one place (metric, ledger row, OpenAI-shaped response).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import anyio.to_thread
from fastapi import Request
from starlette.requests import ClientDisconnect

from ferry.gateway.bodies import STREAMING, check_body
from ferry.gateway.config import ModelRoute
from ferry.gateway.data_class import HEADER, DataClassDecision, UnknownDataClass
from ferry.gateway.keys import KeyRecord
from ferry.gateway.ledger import CLIENT_CLOSED, LedgerRow
from ferry.gateway.limits import Estimate, Refusal
from ferry.gateway.state import Gateway
from ferry.openai_errors import OpenAIError, parse_json_object

log = logging.getLogger("ferry.gateway")


@dataclass(frozen=True)
class Rejection:
    """A request refused before any backend: what the client gets and what the ledger and metrics say."""

    error: OpenAIError
    blocked: str  # the ``ferry_gateway:blocked_total{reason}`` label
    reason: str  # the ledger row's reason
    # NOTE: False for the limits' 429s: ``Limits.admit`` wrote the refused row in the transaction
    # that counted the limit, so writing one here would count the request twice.
    write_row: bool = True


@dataclass(frozen=True)
class Caller:
    """Who is asking: a virtual key, or the master key (``key`` None: every model, no limits)."""

    key: KeyRecord | None

    def row(self) -> LedgerRow:
        k = self.key
        return LedgerRow(key_id=k.id if k else "master", key_name=k.name if k else "master",
                         team=k.team if k else None)


@dataclass(frozen=True)
class Admitted:
    """A request past every stage; its pending ledger row ``row_id`` holds its reservation."""

    caller: Caller
    body: dict[str, Any]
    route: ModelRoute
    decision: DataClassDecision
    row_id: int
    reserve: Estimate = field(default_factory=Estimate)  # what its row holds; a cut stream's prompt is billed from it
    endpoint: str = "chat/completions"

    @property
    def stream(self) -> bool:
        return streams(self.endpoint, self.body)


def streams(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether the answer is an event stream: asked for, on an endpoint that has one."""
    return endpoint in STREAMING and bool(body.get("stream"))


@dataclass(frozen=True)
class Refused:
    """A rejection and the ledger row as far as the stages got (who, and what they asked for)."""

    rejection: Rejection
    row: LedgerRow


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def authenticate(gw: Gateway, request: Request) -> Caller | Rejection:
    secret = bearer(request)
    if gw.is_master(secret):
        return Caller(None)
    key = await gw.db(gw.keys.lookup, secret) if secret else None
    if key is None:
        return Rejection(OpenAIError(401, "Incorrect or missing API key.", type="invalid_request_error",
                                     code="invalid_api_key"), "auth", "missing or invalid API key")
    return Caller(key)


async def parse(request: Request, endpoint: str) -> dict[str, Any] | Rejection:
    """The body as a JSON object whose OpenAI fields have OpenAI's types (``gateway.bodies``).

    NOTE: the same strict reading as ``ferry serve``'s: a lone surrogate, nesting past 200 levels, a
    number out of float range or a non-JSON Content-Type is a 400 here, not a 500 further on.
    """
    try:
        raw = await request.body()
    except ClientDisconnect:
        # NOTE: the client hung up before its body was read (uvicorn then hands out the disconnect
        # instead of the buffered body): nobody gets the answer, but the ledger and metrics count it.
        return Rejection(OpenAIError(CLIENT_CLOSED, "client disconnected before its body was read"),
                         "client_closed", "client disconnected before its body was read")
    try:
        body = parse_json_object(raw, request.headers.get("content-type"))
        check_body(endpoint, body)
    except OpenAIError as error:
        log.info("refused a request body: %s", error.message[:300])
        return Rejection(error, "bad_request", error.message[:300])
    return body


def resolve_model(gw: Gateway, caller: Caller, body: dict[str, Any], endpoint: str = "chat/completions"
                  ) -> ModelRoute | Rejection:
    model = body.get("model")
    route = gw.config.model(model) if isinstance(model, str) else None
    if route is None:
        return Rejection(OpenAIError(404, f"The model {model!r} does not exist.", code="model_not_found",
                                     param="model"), "model_not_found", "unknown model")
    if not any(gw.config.backend(d.backend).serves(endpoint) for d in route.deployments):
        kinds = sorted({gw.config.backend(d.backend).kind for d in route.deployments})
        message = f"The model {route.name!r} is served by {', '.join(kinds)} backends only, which have no /v1/{endpoint}."
        return Rejection(OpenAIError(400, message, code="unsupported_endpoint", param="model"),
                         "bad_request", message)
    key = caller.key
    if key is not None and not key.allows(route.name):
        return Rejection(OpenAIError(403, f"Key {key.name!r} may not use model {route.name!r}.",
                                     code="model_not_allowed", param="model"),
                         "model_not_allowed", "model not allowed for key")
    return route


# NOTE: a body past this many bytes (or of unknown length) is scanned for PII on a worker thread, so
# a long scan cannot stall the event loop's other requests; small ones skip the thread hop.
_SCAN_INLINE_BYTES = 64 * 1024


async def data_class(gw: Gateway, caller: Caller, request: Request, body: dict[str, Any]
                     ) -> DataClassDecision | Rejection:
    key_default = caller.key.data_class if caller.key else None
    header = request.headers.get(HEADER)
    length = request.headers.get("content-length", "")
    try:
        if length.isdigit() and int(length) <= _SCAN_INLINE_BYTES:
            decision = gw.data_classes.decide(key_default, header, body)
        else:
            decision = await anyio.to_thread.run_sync(gw.data_classes.decide, key_default, header, body)
    except UnknownDataClass as e:
        reason = f"{HEADER}: {e}"
        return Rejection(OpenAIError(400, reason, code="unknown_data_class"), "bad_request", reason)
    for kind in decision.pii:
        gw.metrics.pii_detections.labels(kind).inc()
    return decision


async def admit(gw: Gateway, caller: Caller, body: dict[str, Any], endpoint: str, route: ModelRoute,
                decision: DataClassDecision, row: LedgerRow) -> tuple[int, Estimate] | Rejection:
    """RPM, TPM and budgets; the pending row's id and reservation, or a 429 whose row ``Limits.admit`` wrote."""
    # NOTE: the backend is chosen after admission, so the reservation is the most the request may
    # use on any deployment its data class allows (reservation.py); counted exactly by the backends
    # only where a TPM limit or a budget will look at it.
    reserve = await gw.reserver.estimate(body, endpoint, route, decision.locations,
                                         exact=gw.limits.counts_usage(caller.key))
    admitted = await gw.db(gw.limits.admit, caller.key, row, reserve)
    if not isinstance(admitted, Refusal):
        return admitted.row_id, reserve
    if admitted.retry_after is not None:
        error = OpenAIError(429, admitted.message, code="rate_limit_exceeded",
                            headers={"Retry-After": str(admitted.retry_after)})
    else:
        error = OpenAIError(429, admitted.message, type="insufficient_quota", code="budget_exceeded")
    return Rejection(error, admitted.reason, f"{admitted.reason}: {admitted.message}", write_row=False)


async def run_stages(gw: Gateway, request: Request, endpoint: str) -> Admitted | Refused:
    caller = await authenticate(gw, request)
    if isinstance(caller, Rejection):
        return Refused(caller, LedgerRow())
    row = caller.row()
    body = await parse(request, endpoint)
    if isinstance(body, Rejection):
        return Refused(body, row)
    model = body.get("model")
    row = replace(row, model=model if isinstance(model, str) else None, stream=streams(endpoint, body))
    route = resolve_model(gw, caller, body, endpoint)
    if isinstance(route, Rejection):
        return Refused(route, row)
    decision = await data_class(gw, caller, request, body)
    if isinstance(decision, Rejection):
        return Refused(decision, row)
    row = replace(row, data_class=decision.name, pii=bool(decision.pii), pii_kinds=",".join(decision.pii) or None)
    admitted = await admit(gw, caller, body, endpoint, route, decision, row)
    if isinstance(admitted, Rejection):
        return Refused(admitted, row)
    return Admitted(caller, body, route, decision, *admitted, endpoint=endpoint)
