"""What the routes share: one ``ServerState`` per app, on ``app.state.ferry`` (no module globals)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.config import ServerConfig
from ferry.engine.async_engine import AsyncEngine
from ferry.openai_errors import OpenAIError
from ferry.server.admission import AdmissionController
from ferry.server.metrics import ServerMetrics

EngineLoader = Callable[[], AsyncEngine]


@dataclass
class ServerState:
    """Everything the routes share. Mutated only on the event loop thread."""

    config: ServerConfig
    admission: AdmissionController
    engine: AsyncEngine | None = None
    metrics: ServerMetrics | None = None
    served_model_name: str | None = None  # the name responses carry
    served_model_names: tuple[str, ...] = ()  # every name requests may use, that one first
    # sampling defaults for fields a request leaves unset (--generation-config)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    load_error: str | None = None
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    owns_engine: bool = False

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def set_engine(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.served_model_names = self.config.served_model_names or (engine.model_name,)
        self.served_model_name = self.served_model_names[0]
        # NOTE: an engine given by an embedder or a test without a generation config (a mapping)
        # gets OpenAI's defaults; a remote engine (ferry.cluster) carries its replicas'.
        defaults = getattr(engine, "generation_defaults", None)
        if isinstance(engine, AsyncEngine) or isinstance(defaults, Mapping):
            self.generation_defaults = dict(engine.generation_defaults)
        self.metrics = ServerMetrics(self.served_model_name, engine.max_model_len, engine.stats)

    def require_engine(self) -> AsyncEngine:
        """The loaded engine; a 503 (with Retry-After) while it loads or after its load failed."""
        if self.engine is None:
            message = ("the model failed to load: " + self.load_error if self.load_error
                       else "the model is still loading; retry shortly")
            raise OpenAIError(503, message, code="model_not_ready", headers={"Retry-After": "1"})
        return self.engine


def get_state(app: Any) -> ServerState:
    """The ``ServerState`` of an app made by ``build_app``."""
    state = app.state.ferry
    if not isinstance(state, ServerState):
        raise RuntimeError("app.state.ferry is not a ServerState; build the app with build_app")
    return state
