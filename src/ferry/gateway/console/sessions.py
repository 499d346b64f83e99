"""The console's login sessions and CSRF tokens, held in memory by one gateway app.

A session is a random id in an HttpOnly, SameSite=Strict cookie; the server keeps the id's hash, its
CSRF token and its times. Logging out (or the gateway restarting) ends it for good. Every POST must
carry the session's CSRF token in its form; the login form, sent before any session exists, carries
a token that must match a short-lived cookie of its own (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "ferry_console"
LOGIN_COOKIE = "ferry_console_login"
COOKIE_PATH = "/ui"
IDLE_TIMEOUT_S = 30 * 60  # a session nobody used for this long is over
MAX_AGE_S = 12 * 3600  # and any session after this long, used or not
LOGIN_TOKEN_AGE_S = 15 * 60  # how long a login form stays good
MAX_SESSIONS = 256  # NOTE: bounds memory if something logs in in a loop; the oldest go first


@dataclass
class Session:
    csrf: str
    created: float
    last_seen: float


def _digest(session_id: str) -> str:
    # NOTE: only the id's hash is kept, so a memory dump or a debugger shows no usable cookie.
    return hashlib.sha256(session_id.encode()).hexdigest()


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; False when either side is missing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class SessionStore:
    """Live sessions by the hash of their id. Called from the event loop and from worker threads."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: its id (for the cookie, never stored) and its record."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        with self._lock:
            self._drop_expired(now)
            while len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
                del self._sessions[oldest]
            self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        """The live session for a cookie's id (and mark it used), or None."""
        if not session_id:
            return None
        now = time.time() if now is None else now
        with self._lock:
            key = _digest(session_id)
            session = self._sessions.get(key)
            if session is None:
                return None
            if now - session.last_seen > IDLE_TIMEOUT_S or now - session.created > MAX_AGE_S:
                del self._sessions[key]
                return None
            session.last_seen = now
            return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_digest(session_id), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items()
                    if now - s.last_seen > IDLE_TIMEOUT_S or now - s.created > MAX_AGE_S]:
            del self._sessions[key]


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    """HttpOnly, SameSite=Strict, limited to /ui; Secure when the console is served over https.

    NOTE: behind a TLS-terminating proxy the scheme is https only when uvicorn trusts the proxy's
    X-Forwarded-Proto (``--forwarded-allow-ips``); docs/console.md says so.
    """
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
