"""What a request that cannot be translated raises, and error bodies in both APIs' shapes."""

from __future__ import annotations

from typing import Any

# Anthropic's error types by HTTP status (its documented table); OpenAI's clients read ``type``
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 529: "overloaded_error"}


class TranslationError(ValueError):
    """The request asks for something the other API cannot express (a 400 naming it)."""


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def openai_error_from_anthropic(status: int, body: Any) -> dict[str, Any]:
    """An Anthropic error body (``{"type": "error", "error": {"type", "message"}}``) in OpenAI's shape."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        kind, message = str(error.get("type") or "api_error"), str(error.get("message") or "")
    else:
        kind, message = anthropic_error_type(status), str(body)[:500]
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def anthropic_error_from_openai(status: int, body: Any) -> dict[str, Any]:
    """An OpenAI error body (``{"error": {"message", "type", ...}}``) in Anthropic's shape."""
    error = body.get("error") if isinstance(body, dict) else None
    message = str(error.get("message") or "") if isinstance(error, dict) else str(body)[:500]
    return anthropic_error(status, message)
