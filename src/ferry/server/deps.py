"""Request dependencies: what a route needs, declared as FastAPI ``Depends`` and resolved per request.

A route names them in its signature instead of reaching into ``app.state``::

    _body = json_body(TokenizeRequest)

    @router.post("/tokenize", dependencies=[Depends(_body.model_name)])
    async def tokenize(req: Annotated[TokenizeRequest, Depends(_body.parse)], engine: Engine) -> ...

FastAPI solves a route's dependencies in the order of its parameters (a dependency's own ones
first) and each at most once per request, so the errors keep one order everywhere: a bad body
(400), then no engine yet (503), then a model name this server does not serve (404).
"""

# NOTE: no `from __future__ import annotations`: FastAPI reads these signatures at run time, and
# the functions made by `json_body` name a closure variable in their annotations, which a string
# annotation could not resolve.

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Generic, Protocol, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from ferry.engine.async_engine import AsyncEngine
from ferry.openai_errors import OpenAIError, parse_json_object, validation_error_to_openai
from ferry.server.logging import log_info_of
from ferry.server.state import ServerState, get_state

M = TypeVar("M", bound=BaseModel)

# NOTE: every dependency here is `async def`: FastAPI runs a plain `def` dependency in a worker
# thread, and ServerState is only touched on the event loop thread.


async def server_state(request: Request) -> ServerState:
    return get_state(request.app)


State = Annotated[ServerState, Depends(server_state)]


async def ready_engine(state: State) -> AsyncEngine:
    """The loaded engine, or a 503 while the model loads (or after its load failed)."""
    return state.require_engine()


Engine = Annotated[AsyncEngine, Depends(ready_engine)]


def check_model(state: ServerState, model: str | None) -> str:
    """The name responses carry (the first served name, as vLLM); a 404 when the client asked for
    a model this server does not serve under any of its names."""
    name = state.served_model_name or ""
    if model is not None and model not in state.served_model_names:
        served = ", ".join(f"`{n}`" for n in state.served_model_names) or f"`{name}`"
        raise OpenAIError(404, f"The model `{model}` does not exist. This server serves {served}.",
                          param="model", code="model_not_found")
    return name


class NamesModel(Protocol):
    """A request body with OpenAI's optional ``model`` field."""

    model: str | None


@dataclass(frozen=True)
class JSONBody(Generic[M]):
    """A route's JSON body as two dependencies that share one parse per request.

    ``parse``: the body read strictly (``ferry.openai_errors.parse_json_object``: JSON content
    type, no lone surrogates, nesting, NaN or overflow) and validated as the route's strict model;
    a 400 on any problem, its reason also in the access log line.
    ``model_name``: the served model name, once the body and the engine are OK (404 for another).
    """

    parse: Callable[[Request], Awaitable[M]]
    model_name: Callable[..., Awaitable[str]]


def json_body(model: type[M]) -> JSONBody[M]:
    """The body dependencies for ``model``; make them once per route module (FastAPI caches a
    dependency's result per request by its function)."""

    async def parse_body(request: Request) -> M:
        try:
            obj = parse_json_object(await request.body(), request.headers.get("content-type"))
            try:
                # NOTE: the models are strict (protocol._Request): "stream": "yes" is a 400, as
                # in OpenAI's API, not True.
                config = get_state(request.app).config
                return model.model_validate(obj, context={
                    "max_logprobs": config.max_logprobs, "strict_params": config.strict_params})
            except ValidationError as exc:
                raise validation_error_to_openai(list(exc.errors())) from exc
        except OpenAIError as error:
            info = log_info_of(request.scope)
            if info is not None:  # the access log line says why the body was refused
                info.error = error.message[:300]
            raise

    async def served_model_name(req: Annotated[NamesModel, Depends(parse_body)], _: Engine,
                                state: State) -> str:
        return check_model(state, req.model)

    return JSONBody(parse_body, served_model_name)
