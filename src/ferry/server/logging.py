"""Request logging: one line per request (id, status, tokens, TTFT, total time), text or JSON.

``AccessLogMiddleware`` puts a ``RequestLogInfo`` in the ASGI scope's state; routes fill in what
they know (tokens, TTFT) and the middleware writes the line when the response's last byte is sent,
so streamed responses are logged once, at their real end. Probes (``/health``, ``/metrics``) are
logged at DEBUG, so the INFO log shows requests only. The format (text or JSON lines) is
``ferry.logformat``'s, shared with `ferry gateway`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferry.logformat import JsonFormatter, configure_logging, is_probe

__all__ = ["ACCESS_LOGGER", "AccessLogMiddleware", "JsonFormatter", "RequestLogInfo", "configure_logging",
           "log_info_of"]

ACCESS_LOGGER = "ferry.server.access"
LOG_INFO_KEY = "ferry_log"
_REQUEST_ID_HEADER = b"x-request-id"


@dataclass
class RequestLogInfo:
    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    error: str | None = None
    logged: bool = False
    probe: bool = False  # /health or /metrics: logged at DEBUG

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id, "method": self.method, "path": self.path,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "total_ms": round((time.monotonic() - self.start) * 1000, 1),
        }
        if self.error:
            out["error"] = self.error
        return out


def log_info_of(scope: Scope) -> RequestLogInfo | None:
    info = scope.get("state", {}).get(LOG_INFO_KEY)
    return info if isinstance(info, RequestLogInfo) else None


class AccessLogMiddleware:
    """The request log; ``enabled=False`` (``--disable-log-requests``) writes no lines but still
    gives each request its id (``x-request-id``) and its log info for the routes to fill."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(_REQUEST_ID_HEADER)
        request_id = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
        info = RequestLogInfo(request_id=request_id, method=scope["method"], path=scope["path"],
                              probe=is_probe(get_route_path(scope)))
        scope.setdefault("state", {})[LOG_INFO_KEY] = info

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (_REQUEST_ID_HEADER, request_id.encode("latin-1"))]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._log(info)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not info.logged:  # the response never completed: client gone or an error
                if info.status is None:
                    info.error = info.error or "no response sent"
                elif info.error is None:
                    info.error = "response incomplete"
                self._log(info)

    def _log(self, info: RequestLogInfo) -> None:
        if info.logged:
            return
        info.logged = True
        if not self.enabled:
            return
        f = info.fields()
        self.logger.log(
            logging.DEBUG if info.probe else logging.INFO,
            "%s %s %s %s prompt_tokens=%s completion_tokens=%s ttft_ms=%s total_ms=%s%s",
            f["request_id"], f["method"], f["path"], f["status"], f["prompt_tokens"],
            f["completion_tokens"], f["ttft_ms"], f["total_ms"],
            f" error={info.error!r}" if info.error else "", extra={"ferry_fields": f})
