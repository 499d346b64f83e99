"""The FastAPI app factory. All state lives on ``app.state.ferry`` (a ``ServerState``); no globals.

``build_app`` takes either a ready engine (already started) or a zero-argument loader. With a
loader, the app starts answering at once (``/health`` says 503 while loading) and loads the model in
a worker thread, so a slow load never blocks the HTTP server.

Middleware, outermost first::

    AccessLogMiddleware   one log line per request (unless --disable-log-requests), x-request-id header
    CORSMiddleware        only with --allowed-origins: preflights answered before any check
    GuardMiddleware       draining -> 503, API key on /v1 -> 401, body size -> 413
    FastAPI routes        /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, ...

``--root-path /prefix`` (a proxy serves ferry under a prefix) goes to FastAPI, as in vLLM: routes
answer both ``/prefix/v1/...`` (the proxy forwards the path as is) and ``/v1/...`` (it strips it),
and the middleware judges the path with the prefix removed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from ferry.config import SchedulerConfig, ServerConfig
from ferry.disconnect import replay_body
from ferry.engine.async_engine import AsyncEngine
from ferry.openai_errors import OpenAIError, install_error_handlers
from ferry.openapi_bodies import publish_request_models
from ferry.server.admission import AdmissionController
from ferry.server.logging import AccessLogMiddleware
from ferry.server.protocol import REQUEST_MODELS
from ferry.server.routes_admin import router as admin_router
from ferry.server.routes_chat import router as chat_router
from ferry.server.routes_completions import router as completions_router
from ferry.server.routes_models import router as models_router
from ferry.server.state import EngineLoader, ServerState
from ferry.version import __version__

logger = logging.getLogger(__name__)


class GuardMiddleware:
    """Checks that need no route: drain, API key, body size. Pure ASGI so it sees the raw stream."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # NOTE: the path without --root-path's prefix: "/prefix/v1/..." must not escape the API key
        path = get_route_path(scope)
        cfg = self.state.config
        if self.state.draining and path != "/metrics":
            await _send_error(send, OpenAIError(503, "the server is shutting down",
                                                code="server_shutting_down",
                                                headers={"Connection": "close"}))
            return
        if cfg.api_key and path.startswith("/v1"):
            if not _authorized(scope, cfg.api_key):
                await _send_error(send, OpenAIError(401, "Incorrect or missing API key.",
                                                    code="invalid_api_key"))
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = dict(scope.get("headers", [])).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
                await _send_error(send, _too_large(cfg.max_body_bytes))
                return
            body = await _read_body(receive, cfg.max_body_bytes)
            if body is None:
                await _send_error(send, _too_large(cfg.max_body_bytes))
                return
            receive = replay_body(body, receive)
        await self.app(scope, receive, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds the {limit}-byte limit",
                       code="request_too_large", headers={"Connection": "close"})


def _authorized(scope: Scope, api_key: str) -> bool:
    header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it grows past ``limit`` (chunked uploads too)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)




async def _send_error(send: Send, exc: OpenAIError) -> None:
    payload = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _load(state: ServerState, loader: EngineLoader) -> None:
    t0 = time.monotonic()
    try:
        engine = await asyncio.to_thread(loader)
    except Exception as exc:  # reported on /health and by `ferry serve`'s exit code
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.error("model load failed: %s", state.load_error, exc_info=exc)
        return
    state.owns_engine = True
    state.set_engine(engine)
    logger.info("model %s ready in %.1fs (max_model_len=%d)", state.served_model_name,
                time.monotonic() - t0, engine.max_model_len)


def build_app(engine: AsyncEngine | EngineLoader, config: ServerConfig, *,
              max_num_seqs: int = SchedulerConfig.max_num_seqs) -> FastAPI:
    """The HTTP app over ``engine``: a started ``AsyncEngine``, or a loader returning one.

    ``max_num_seqs`` is the engine's batch size; admission lets ``max_num_seqs + config.max_queue``
    sequences in flight (see ``ferry.server.admission``).
    """
    state = ServerState(config=config,
                        admission=AdmissionController(max_num_seqs=max_num_seqs,
                                                      max_queue=config.max_queue))
    loader: EngineLoader | None = None
    if callable(engine) and not hasattr(engine, "generate"):
        loader = engine
    else:
        state.set_engine(engine)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, loader)) if loader is not None else None
        app.state.load_task = task
        try:
            yield
        finally:
            if task is not None and not task.done():
                # NOTE: a thread cannot be cancelled; wait for the load so its engine is shut down.
                await asyncio.shield(task)
            if state.owns_engine and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="ferry", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, root_path=config.root_path)
    app.state.ferry = state
    install_error_handlers(app)
    publish_request_models(app, REQUEST_MODELS)
    for router in (chat_router, completions_router, models_router, admin_router):
        app.include_router(router)
    app.add_middleware(GuardMiddleware, state=state)
    if config.allowed_origins:
        # NOTE: outside the guard: a browser's preflight carries no API key, and a 401 or 503
        # needs CORS headers for the page to read it.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=list(config.allowed_methods),
                           allow_headers=list(config.allowed_headers),
                           allow_credentials=config.allow_credentials)
    app.add_middleware(AccessLogMiddleware, enabled=config.log_requests)
    return app
