"""The console's guards over plain HTTP: CSRF on every form, sessions, headers, the static files."""

from __future__ import annotations

import re
from contextlib import closing

import httpx
import pytest
from gateway.conftest import MASTER
from gateway_console.conftest import Stack, http_session

FORMS = ("/ui/keys", "/ui/logout", "/ui/keys/nokey", "/ui/keys/nokey/revoke")


def key_names(stack: Stack) -> set[str]:
    return {k["name"] for k in stack.gateway.admin.get("/admin/keys").json()["data"]}


@pytest.mark.parametrize("path", FORMS)
def test_a_post_without_or_with_a_wrong_csrf_token_is_403(stack: Stack, path: str) -> None:
    c, csrf = http_session(stack.url)
    with closing(c):
        for token in (None, "", "x" * len(csrf), csrf[:-1]):
            data = {"name": f"csrf-{path}", "rpm": "5", **({"csrf_token": token} if token is not None else {})}
            r = c.post(path, data=data)
            assert r.status_code == 403, (path, token, r.status_code)
            assert "CSRF" in r.text
        assert f"csrf-{path}" not in key_names(stack)
        assert c.get("/ui/keys").status_code == 200  # refused POSTs did not end the session (logout included)


def test_the_right_token_passes_and_a_token_is_good_for_its_own_session_only(stack: Stack) -> None:
    c, csrf = http_session(stack.url)
    other, other_csrf = http_session(stack.url)
    with closing(c), closing(other):
        assert other_csrf != csrf
        assert c.post("/ui/keys", data={"name": "cross", "csrf_token": other_csrf}).status_code == 403
        r = c.post("/ui/keys", data={"name": "csrf-ok", "csrf_token": csrf})
        assert r.status_code == 201 and re.search(r'id="new-key-secret">sk-ferry-', r.text)
        assert "csrf-ok" in key_names(stack) and "cross" not in key_names(stack)
        # a form that is not urlencoded is not a console form
        assert c.post("/ui/keys", json={"name": "j", "csrf_token": csrf}).status_code == 415


def test_a_post_without_a_session_is_403_and_never_redirected(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as anon:
        for path in FORMS:
            r = anon.post(path, data={"name": "anon", "csrf_token": "whatever"})
            assert r.status_code == 403, path
    assert "anon" not in key_names(stack)


def test_the_login_form_checks_its_own_token(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as c:
        r = c.post("/ui/login", data={"master_key": MASTER})
        assert r.status_code == 403 and "ferry_console" not in c.cookies  # no token, no session
        c.get("/ui/login")
        r = c.post("/ui/login", data={"master_key": MASTER, "csrf_token": "forged"})
        assert r.status_code == 403 and "ferry_console" not in c.cookies


def test_pages_without_a_session(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as anon:
        r = anon.get("/ui/ledger.csv")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        # an htmx poll is told to load the login page whole, not to swap it into the table
        r = anon.get("/ui/fragments/backends", headers={"HX-Request": "true"})
        assert r.status_code == 401 and r.headers["HX-Redirect"] == "/ui/login"
        # a cookie the gateway never issued is no session
        anon.cookies.set("ferry_console", "made-up", domain="127.0.0.1", path="/ui")
        assert anon.get("/ui/keys").status_code == 303


def test_security_headers_and_no_key_in_any_url(stack: Stack) -> None:
    c, _ = http_session(stack.url)
    with closing(c):
        r = c.get("/ui/keys")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
        assert MASTER not in r.text
        assert "<script>" not in r.text  # no inline script: the policy would block it


def test_static_files_are_only_the_packaged_ones(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as anon:
        r = anon.get("/ui/static/htmx.min.js")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        assert anon.get("/ui/static/htmx.min.js", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
        assert anon.get("/ui/static/chart.umd.min.js").text.startswith("/*!\n * Chart.js v4.")
        for bad in ("/ui/static/NOTICE.md", "/ui/static/..%2Fsessions.py", "/ui/static/nothing.js"):
            assert anon.get(bad).status_code == 404, bad
