"""The gateway's admin web console at /ui: server-rendered pages (Jinja2 + htmx, Chart.js), behind
the master key. See docs/console.md."""

from ferry.gateway.console.routes import console_router

__all__ = ["console_router"]
