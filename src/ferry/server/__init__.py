"""`ferry serve`: the OpenAI-compatible HTTP server over ``AsyncEngine``.

``build_app(engine, config)`` builds the FastAPI app (state on ``app.state.ferry``, no globals);
``ferry.server.command`` is the CLI entry point.
"""

from __future__ import annotations

from ferry.server.app import build_app
from ferry.server.state import ServerState, get_state

__all__ = ["ServerState", "build_app", "get_state"]
