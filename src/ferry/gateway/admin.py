"""Admin API (master key only): virtual keys and usage."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ferry.gateway.keys import KeySpec
from ferry.gateway.ledger import GROUP_BY, parse_since
from ferry.gateway.stages import bearer
from ferry.gateway.state import Gateway
from ferry.openai_errors import OpenAIError

_SPEC_FIELDS = ("name", "team", "models", "data_class", "budget_usd", "rpm", "tpm")


def admin_router(gw: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def denied(request: Request) -> Response | None:
        if not gw.is_master(bearer(request)):
            return OpenAIError(401, "The admin API needs the master key.", type="invalid_request_error",
                               code="invalid_api_key").response()
        return None

    @router.post("/keys")
    async def create_key(request: Request) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return OpenAIError(400, "The body is not valid JSON.").response()
        if not isinstance(body, dict):
            return OpenAIError(400, "The body must be a JSON object.").response()
        unknown = sorted(set(body) - set(_SPEC_FIELDS))
        if unknown:
            return OpenAIError(400, f"unknown field(s) {unknown}, expected {list(_SPEC_FIELDS)}",
                               param=unknown[0]).response()
        models = body.get("models")
        try:
            spec = KeySpec(**{**body, "models": tuple(models) if isinstance(models, list) else models})
        except (ValueError, TypeError) as e:
            return OpenAIError(400, str(e), param=str(e).split(":")[0]).response()
        if spec.data_class is not None and gw.config.data_class(spec.data_class) is None:
            return OpenAIError(400, f"data_class: unknown data class {spec.data_class!r}",
                               param="data_class").response()
        for m in spec.models or ():
            if gw.config.model(m) is None:
                return OpenAIError(400, f"models: unknown model {m!r}", param="models").response()
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
            return OpenAIError(404, f"no key with id {key_id!r}", code="key_not_found").response()
        return JSONResponse({"id": key_id, "deleted": True})

    @router.get("/usage")
    async def usage(request: Request, group_by: str = "key", since: str | None = None) -> Response:
        if (resp := denied(request)) is not None:
            return resp
        if group_by not in GROUP_BY:
            return OpenAIError(400, f"group_by: must be one of {list(GROUP_BY)}", param="group_by").response()
        try:
            since_ts = parse_since(since)
        except ValueError as e:
            return OpenAIError(400, str(e), param="since").response()
        rows = await gw.db(gw.ledger.usage, group_by, since_ts)
        return JSONResponse({"object": "list", "group_by": group_by, "since": since_ts, "data": rows})

    return router
