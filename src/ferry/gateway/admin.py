"""Admin API (master key only): virtual keys and usage."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ferry.gateway.errors import error_response
from ferry.gateway.keys import KeySpec
from ferry.gateway.ledger import GROUP_BY
from ferry.gateway.proxy import bearer
from ferry.gateway.state import Gateway

_SPEC_FIELDS = ("name", "team", "models", "data_class", "budget_usd", "rpm", "tpm")


def parse_since(value: str | None) -> float | None:
    """Unix seconds or an ISO-8601 time (UTC when it names no zone)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"since: expected unix seconds or an ISO-8601 time, got {value!r}") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def admin_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def denied(request: Request) -> Response | None:
        if not gw.is_master(bearer(request)):
            return error_response(401, "The admin API needs the master key.", "invalid_request_error",
                                  "invalid_api_key")
        return None

    @router.post("/keys")
    async def create_key(request: Request) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "The body is not valid JSON.", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "The body must be a JSON object.", "invalid_request_error")
        unknown = sorted(set(body) - set(_SPEC_FIELDS))
        if unknown:
            return error_response(400, f"unknown field(s) {unknown}, expected {list(_SPEC_FIELDS)}",
                                  "invalid_request_error", param=unknown[0])
        models = body.get("models")
        try:
            spec = KeySpec(**{**body, "models": tuple(models) if isinstance(models, list) else models})
        except (ValueError, TypeError) as e:
            return error_response(400, str(e), "invalid_request_error", param=str(e).split(":")[0])
        if spec.data_class is not None and gw.config.data_class(spec.data_class) is None:
            return error_response(400, f"data_class: unknown data class {spec.data_class!r}",
                                  "invalid_request_error", param="data_class")
        for m in spec.models or ():
            if gw.config.model(m) is None:
                return error_response(400, f"models: unknown model {m!r}", "invalid_request_error", param="models")
        record, secret = await gw.db(gw.keys.create, spec)
        return JSONResponse({**record.public(), "key": secret}, status_code=201)

    @router.get("/keys")
    async def list_keys(request: Request) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        records = await gw.db(gw.keys.list)
        return JSONResponse({"object": "list", "data": [r.public() for r in records]})

    @router.delete("/keys/{key_id}")
    async def delete_key(key_id: str, request: Request) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        if not await gw.db(gw.keys.delete, key_id):
            return error_response(404, f"no key with id {key_id!r}", "invalid_request_error", "key_not_found")
        return JSONResponse({"id": key_id, "deleted": True})

    @router.get("/usage")
    async def usage(request: Request, group_by: str = "key", since: str | None = None) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        if group_by not in GROUP_BY:
            return error_response(400, f"group_by: must be one of {list(GROUP_BY)}", "invalid_request_error",
                                  param="group_by")
        try:
            since_ts = parse_since(since)
        except ValueError as e:
            return error_response(400, str(e), "invalid_request_error", param="since")
        rows = await gw.db(gw.ledger.usage, group_by, since_ts)
        return JSONResponse({"object": "list", "group_by": group_by, "since": since_ts, "data": rows})

    return router
