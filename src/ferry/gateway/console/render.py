"""Server-side rendering: the console's Jinja2 templates, its security headers, its static files."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.responses import HTMLResponse, Response

from ferry.gateway.console.queries import iso

# NOTE: no inline script or style anywhere: the pages' data for charts travels in
# <script type="application/json"> blocks (data, never run) that static/console.js reads.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _money(value: float | None) -> str:
    return "" if value is None else f"${value:,.6f}" if value < 1 else f"${value:,.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


class Renderer:
    def __init__(self) -> None:
        self.env = Environment(loader=PackageLoader("ferry.gateway.console", "templates"),
                               autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(iso=iso, money=_money, pct=_pct, num=_num)
        self._static = _load_static()

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(**context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def static(self, name: str, if_none_match: str | None) -> Response:
        """A vendored or own asset; 404 for anything else (no path from the URL reaches the disk)."""
        found = self._static.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body, etag = found
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        suffix = name[name.rfind("."):]
        return Response(body, media_type=STATIC_TYPES[suffix], headers=headers)


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every .js and .css under static/, read once: name -> (bytes, ETag)."""
    out = {}
    for entry in resources.files("ferry.gateway.console").joinpath("static").iterdir():
        if entry.is_file() and entry.name[entry.name.rfind("."):] in STATIC_TYPES:
            body = entry.read_bytes()
            out[entry.name] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


def json_script(value: Any) -> Markup:
    """JSON safe inside a <script type="application/json"> block: '<' escaped, so no '</script>'."""
    return Markup(json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
