"""The stages a request passes before any backend sees it, in order:

    authenticate -> parse -> resolve model -> data class -> admit

Each stage returns its value or a ``Rejection``; ``run_stages`` chains them and hands back either an
``Admitted`` request (its pending ledger row reserving its estimated usage) or a ``Refused`` one,
which ``InferenceHandler`` records in one place (metric, ledger row, OpenAI-shaped response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from ferry.gateway.config import ModelRoute
from ferry.gateway.data_class import HEADER, DataClassDecision, UnknownDataClass
from ferry.gateway.keys import KeyRecord
from ferry.gateway.ledger import LedgerRow
from ferry.gateway.limits import Refusal, dearest_prices, estimate
from ferry.gateway.state import Gateway
from ferry.openai_errors import OpenAIError


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

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


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


async def parse(request: Request) -> dict[str, Any] | Rejection:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return Rejection(OpenAIError(400, "The body must be a JSON object."), "bad_request",
                         "body is not a JSON object")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        return Rejection(OpenAIError(400, "stream_options must be an object.", code="invalid_value",
                                     param="stream_options"), "bad_request", "stream_options is not an object")
    return body


def resolve_model(gw: Gateway, caller: Caller, body: dict[str, Any]) -> ModelRoute | Rejection:
    model = body.get("model")
    route = gw.config.model(model) if isinstance(model, str) else None
    if route is None:
        return Rejection(OpenAIError(404, f"The model {model!r} does not exist.", code="model_not_found",
                                     param="model"), "model_not_found", "unknown model")
    key = caller.key
    if key is not None and not key.allows(route.name):
        return Rejection(OpenAIError(403, f"Key {key.name!r} may not use model {route.name!r}.",
                                     code="model_not_allowed", param="model"),
                         "model_not_allowed", "model not allowed for key")
    return route


def data_class(gw: Gateway, caller: Caller, request: Request, body: dict[str, Any]
               ) -> DataClassDecision | Rejection:
    key_default = caller.key.data_class if caller.key else None
    try:
        return gw.data_classes.decide(key_default, request.headers.get(HEADER), body)
    except UnknownDataClass as e:
        reason = f"{HEADER}: {e}"
        return Rejection(OpenAIError(400, reason, code="unknown_data_class"), "bad_request", reason)


async def admit(gw: Gateway, caller: Caller, body: dict[str, Any], endpoint: str, route: ModelRoute,
                decision: DataClassDecision, row: LedgerRow) -> int | Rejection:
    """RPM, TPM and budgets; the pending row's id, or a 429 whose row ``Limits.admit`` wrote."""
    # NOTE: the backend is chosen after admission, so the reservation is priced at the dearest
    # deployment this request's data class allows.
    reserve = estimate(body, endpoint, *dearest_prices(gw.config, route, decision.locations))
    admitted = await gw.db(gw.limits.admit, caller.key, row, reserve)
    if not isinstance(admitted, Refusal):
        return admitted.row_id
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
    body = await parse(request)
    if isinstance(body, Rejection):
        return Refused(body, row)
    model = body.get("model")
    row = replace(row, model=model if isinstance(model, str) else None, stream=bool(body.get("stream")))
    route = resolve_model(gw, caller, body)
    if isinstance(route, Rejection):
        return Refused(route, row)
    decision = data_class(gw, caller, request, body)
    if isinstance(decision, Rejection):
        return Refused(decision, row)
    row = replace(row, data_class=decision.name, pii=bool(decision.pii), pii_kinds=",".join(decision.pii) or None)
    row_id = await admit(gw, caller, body, endpoint, route, decision, row)
    if isinstance(row_id, Rejection):
        return Refused(row_id, row)
    return Admitted(caller, body, route, decision, row_id)
