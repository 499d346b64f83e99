"""OpenAI's error shape, built in one place for ``ferry serve`` and ``ferry gateway``.

Every error leaves either server as ``{"error": {"message", "type", "param", "code"}}`` with the
matching HTTP status, so that the official SDK raises its typed exceptions (``BadRequestError``,
``NotFoundError``, ``AuthenticationError``, ``RateLimitError``, ...). ``parse_json_object`` is the
one strict reading of a request body both use, so that bad input (a lone surrogate, JSON nested
thousands deep, a number out of float range, a ``text/plain`` body) is a 400 in that shape, never a
500. A leaf module: it imports nothing from ferry, so the server and the gateway (sibling layers)
can both use it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import pydantic_core
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
        return ErrorResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ErrorResponse(JSONResponse):
    """An error body as ASCII-only JSON.

    NOTE: an error message may quote the client's input; escaping every non-ASCII character means
    even a lone surrogate renders (as ``\\ud800``) instead of failing to encode as UTF-8 inside
    the error handler, which would turn a 400 into a 500 and drop the connection.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode()


def error_body(status_code: int, message: str, *, type: str | None = None,
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message,
                      "type": type or _TYPES.get(status_code, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------
# Request bodies

# NOTE: pydantic-core's JSON parser (jiter) stops at this depth with "recursion limit exceeded";
# the standard library's json.loads would instead raise RecursionError thousands of levels down.
MAX_JSON_DEPTH = 200
# A number can only overflow to infinity with an exponent or with ~309 integer digits.
_MAYBE_OVERFLOW = re.compile(rb"[0-9][eE]|[0-9]{300}")


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (any parameters); no header at all counts.

    NOTE: a missing Content-Type is read as JSON: scripts that post raw bytes send none, and a
    JSON API can mean nothing else. A declared non-JSON type (``text/plain``, curl's default form
    encoding) is refused: the client says the body is something else.
    """
    if content_type is None or not content_type.strip():
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def parse_json_object(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A request body as a JSON object, or an ``OpenAIError`` 400 saying what is wrong with it.

    Strict where Python's ``json`` is lax: a lone surrogate escape (``"\\ud800"``, which no UTF-8
    text can hold and which breaks the tokenizer or the response encoder further on), invalid
    UTF-8, ``NaN``/``Infinity``, a number that overflows a float, and nesting deeper than
    ``MAX_JSON_DEPTH`` are all refused before anything reads the body.
    """
    if not is_json_content_type(content_type):
        media = (content_type or "").split(";", 1)[0].strip()
        raise bad_request(f"The request body must be JSON, sent with 'Content-Type: "
                          f"application/json', not {media!r}.", code="invalid_content_type")
    try:
        obj = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        detail = str(exc)
        if "recursion limit" in detail:
            raise bad_request(f"The request body is nested too deeply: JSON nesting is limited to "
                              f"{MAX_JSON_DEPTH} levels.", code="invalid_json") from exc
        raise bad_request(f"The request body is not valid JSON: {detail}",
                          code="invalid_json") from exc
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    if _MAYBE_OVERFLOW.search(raw) and not _all_finite(obj):
        raise bad_request("The request body holds a number out of the range of a 64-bit float.",
                          code="invalid_json")
    return obj


def _all_finite(value: Any) -> bool:
    """Whether no float in a parsed JSON value is infinite (the parser turns 1e999 into inf)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


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
    return ErrorResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                         headers=getattr(exc, "headers", None))


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ErrorResponse(error_body(500, f"Internal server error: {type(exc).__name__}"),
                         status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
