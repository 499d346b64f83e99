"""The gateway's FastAPI app factory; every piece of state hangs off the ``Gateway`` it builds."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ferry.gateway.admin import admin_router
from ferry.gateway.bodies import BODIES
from ferry.gateway.config import GatewayConfig
from ferry.gateway.console import console_router
from ferry.gateway.messages_ingress import MessagesIngress
from ferry.gateway.proxy import InferenceHandler
from ferry.gateway.stages import Rejection, authenticate
from ferry.gateway.state import Gateway
from ferry.openai_errors import install_error_handlers
from ferry.openapi_bodies import publish_request_models, request_body


def create_app(config: GatewayConfig, env: Mapping[str, str] | None = None, *, instance: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """Build a gateway app; raises ``ValueError`` naming the key when a secret it needs is missing."""
    gw = Gateway(config, os.environ if env is None else env, instance, transport)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="ferry gateway", lifespan=lifespan)
    app.state.gateway = gw
    # NOTE: the server's handlers: unknown routes, 405s, validation errors and unforeseen exceptions
    # leave in OpenAI's error shape too, not FastAPI's {"detail": ...}.
    install_error_handlers(app)
    publish_request_models(app, list(BODIES.values()))
    handler = InferenceHandler(gw)

    @app.post("/v1/chat/completions", openapi_extra=request_body(BODIES["chat/completions"]))
    async def chat_completions(request: Request) -> Response:
        return await handler(request, "chat/completions")

    @app.post("/v1/completions", openapi_extra=request_body(BODIES["completions"]))
    async def completions(request: Request) -> Response:
        return await handler(request, "completions")

    messages_ingress = MessagesIngress(handler)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        """Anthropic's Messages API over the same routing (ferry.gateway.messages_ingress)."""
        return await messages_ingress(request)

    @app.post("/v1/embeddings", openapi_extra=request_body(BODIES["embeddings"]))
    async def embeddings(request: Request) -> Response:
        return await handler(request, "embeddings")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        caller = await authenticate(gw, request)
        if isinstance(caller, Rejection):
            return caller.error.response()  # NOTE: listing models is not a request: no ledger row, no metric
        key = caller.key
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "ferry-gateway"}
                for m in config.models if key is None or key.allows(m.name)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        # NOTE: "state" unknown until the backend first answers; "up" only once it is known up (health.py)
        states = {name: gw.states.state(b) for name, b in gw.backends.items()}
        backends = {b.name: {"location": b.location, "state": states[b.name], "up": states[b.name] == "up",
                             "inflight": b.inflight, "saturated": gw.router.saturated(b)}
                    for b in gw.backends.values()}
        database = {"url": gw.database_name, "up": gw.database.cause is None, "error": gw.database.cause,
                    "down_since": gw.database.down_since, "waiting_writes": gw.ledger.backlog}
        # NOTE: degraded, still 200: a liveness probe must not restart a gateway for its database's
        # outage (a restart cannot fix it, and would drop the settlements waiting in memory).
        up = "up" in states.values() and gw.database.cause is None
        return JSONResponse({"status": "ok" if up else "degraded", "backends": backends, "database": database})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router(gw))
    app.include_router(console_router(gw))
    return app
