"""OpenAI's error shape, built in one place for ``ferry serve`` and ``ferry gateway``.

Every error leaves either server as ``{"error": {"message", "type", "param", "code"}}`` with the
matching HTTP status, so that the official SDK raises its typed exceptions (``BadRequestError``,
``NotFoundError``, ``AuthenticationError``, ``RateLimitError``, ...). A leaf module: it imports
nothing from ferry, so the server and the gateway (sibling layers) can both use it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error ``type``
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error to send in OpenAI's shape; raise it anywhere inside a route, or ``response()`` it.

    ``type`` defaults from the status (``_TYPES``); pass it where a status has more than one
    meaning (a 429 is ``rate_limit_error`` or ``insufficient_quota``).
    """

    def __init__(self, status_code: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status_code, self.message, type=self.type, param=self.param,
                          code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(status_code: int, message: str, *, type: str | None = None,
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message,
                      "type": type or _TYPES.get(status_code, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages.0.role".

    The leading "body" and pydantic's union-member tags ("str", "list[int]", "TextContentPart") are
    dropped: they name a type, not a field.
    """
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p == "body" or p in _TYPE_TAGS or "[" in p or p[:1].isupper():
            continue
        else:
            parts.append(p)
    return ".".join(parts) or None


def validation_error_to_openai(errors: list[dict[str, Any]]) -> OpenAIError:
    """A pydantic error list -> one 400 naming the first offending field."""
    if not errors:
        return bad_request("invalid request body")
    # NOTE: a union field reports one error per member ("not a string", "not a list", ...); our own
    # validators' messages ("... is not supported") say more, so they win.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    param = _loc_to_param(tuple(first.get("loc", ())))
    cause = (first.get("ctx") or {}).get("error")
    if param is None and isinstance(getattr(cause, "param", None), str):
        param = cause.param  # a ParamError from a cross-field validator
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return bad_request(f"The request body is not valid JSON: {detail}", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unsupported parameter: '{param}' is not supported by this server.",
                           param=param, code="unsupported_parameter")
    msg = str(first.get("msg", "invalid value"))
    # NOTE: pydantic prefixes messages of ValueErrors raised in validators with "Value error, ".
    msg = msg.removeprefix("Value error, ")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    text = f"Invalid value for '{param}': {msg}" if param else msg
    return bad_request(text, param=param, code="invalid_value")


async def _openai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)  # registered for OpenAIError only
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (RequestValidationError, ValidationError))
    return validation_error_to_openai(list(exc.errors())).response()


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"Not found: {request.method} {request.url.path}"
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(500, f"Internal server error: {type(exc).__name__}"),
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
