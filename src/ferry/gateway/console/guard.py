"""Who may see the console: a logged-in session for every page, its CSRF token on every POST."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from ferry.gateway.console.forms import FormError, read_form
from ferry.gateway.console.render import SECURITY_HEADERS
from ferry.gateway.console.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionStore,
    same_token,
)

log = logging.getLogger("ferry.gateway")

LOGIN_PATH = "/ui/login"
CSRF_FIELD = "csrf_token"


def forbidden(why: str) -> Response:
    return PlainTextResponse(f"403 Forbidden: {why}", status_code=403, headers=SECURITY_HEADERS)


class Guard:
    def __init__(self) -> None:
        self.sessions = SessionStore()

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def page(self, request: Request) -> Session | Response:
        """The session behind a GET, or where to go without one: the login page; an htmx poll is
        told to load it as a whole page (``HX-Redirect``), not to swap it into a table."""
        session = self.session(request)
        if session is not None:
            return session
        if request.headers.get("HX-Request") == "true":
            return Response(status_code=401, headers={"HX-Redirect": LOGIN_PATH, **SECURITY_HEADERS})
        return RedirectResponse(LOGIN_PATH, status_code=303, headers=SECURITY_HEADERS)

    async def post(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The session and form of a POST whose CSRF token is the session's; else a 403 (or the
        form's own 4xx). NOTE: no session is a 403 as well: a POST is never redirected to the login
        page, so that no action replays after logging in."""
        session = self.session(request)
        if session is None:
            return forbidden("no console session (log in at /ui/login)")
        try:
            form = await read_form(request)
        except FormError as e:
            return PlainTextResponse(str(e), status_code=e.status, headers=SECURITY_HEADERS)
        if not same_token(form.get(CSRF_FIELD), session.csrf):
            log.warning("console: POST %s refused, missing or wrong CSRF token", request.url.path)
            return forbidden("missing or wrong CSRF token")
        return session, form

    async def login_form(self, request: Request) -> dict[str, str] | Response:
        """The login form, if its token matches the login cookie set with it (double submit)."""
        try:
            form = await read_form(request)
        except FormError as e:
            return PlainTextResponse(str(e), status_code=e.status, headers=SECURITY_HEADERS)
        if not same_token(form.get(CSRF_FIELD), request.cookies.get(LOGIN_COOKIE)):
            log.warning("console: login refused, missing or wrong CSRF token")
            return forbidden("missing or wrong CSRF token (reload the login page)")
        return form
