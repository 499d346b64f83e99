"""Admin API (master key only): virtual keys and usage."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ferry.gateway.keys import KeyRecord, KeySpec
from ferry.gateway.ledger import GROUP_BY, parse_since
from ferry.gateway.stages import bearer
from ferry.gateway.state import Gateway
from ferry.openai_errors import OpenAIError

_SPEC_FIELDS = ("name", "team", "models", "data_class", "budget_usd", "rpm", "tpm")


class KeySpecError(ValueError):
    """Key settings the admin API refuses; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def key_spec(gw: Gateway, body: dict[str, object], base: KeyRecord | None = None) -> KeySpec:
    """Key settings from an admin's request (the API's JSON body, the console's form), checked
    against the config; fields ``body`` leaves out keep ``base``'s values. Raises ``KeySpecError``."""
    unknown = sorted(set(body) - set(_SPEC_FIELDS))
    if unknown:
        raise KeySpecError(unknown[0], f"unknown field(s) {unknown}, expected {list(_SPEC_FIELDS)}")
    fields = {**(vars(base.spec()) if base is not None else {}), **body}
    models = fields.get("models")
    try:
        spec = KeySpec(**{**fields, "models": tuple(models) if isinstance(models, list) else models})
    except (ValueError, TypeError) as e:
        raise KeySpecError(str(e).split(":")[0], str(e)) from e
    if spec.data_class is not None and gw.config.data_class(spec.data_class) is None:
        raise KeySpecError("data_class", f"data_class: unknown data class {spec.data_class!r}")
    for m in spec.models or ():
        if gw.config.model(m) is None:
            raise KeySpecError("models", f"models: unknown model {m!r}")
    return spec


async def json_object(request: Request) -> dict[str, object] | Response:
    """The request's JSON object body, or the 400 to answer."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return OpenAIError(400, "The body is not valid JSON.").response()
    if not isinstance(body, dict):
        return OpenAIError(400, "The body must be a JSON object.").response()
    return body


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
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        try:
            spec = key_spec(gw, body)
        except KeySpecError as e:
            return OpenAIError(400, str(e), param=e.param).response()
        record, secret = await gw.db(gw.keys.create, spec)
        return JSONResponse({**record.public(), "key": secret}, status_code=201)

    @router.patch("/keys/{key_id}")
    async def update_key(key_id: str, request: Request) -> Response:
        """Change a key's settings (budget, limits, ...); the fields the body leaves out stay."""
        if (resp := denied(request)) is not None:
            return resp
        body = await json_object(request)
        if isinstance(body, Response):
            return body
        record = await gw.db(gw.keys.get, key_id)
        if record is None:
            return OpenAIError(404, f"no key with id {key_id!r}", code="key_not_found").response()
        try:
            spec = key_spec(gw, body, base=record)
        except KeySpecError as e:
            return OpenAIError(400, str(e), param=e.param).response()
        updated = await gw.db(gw.keys.update, key_id, spec)
        if updated is None:  # NOTE: revoked between the read and the write
            return OpenAIError(404, f"no key with id {key_id!r}", code="key_not_found").response()
        return JSONResponse(updated.public())

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
