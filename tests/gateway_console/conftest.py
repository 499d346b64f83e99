"""The console's test harness: one real gateway (HTTP, 127.0.0.1) over two fake upstreams, and Debian's
Chromium driven by Playwright. Browser tests skip with a message where either is missing."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from gateway.conftest import MASTER, GatewayHarness, backend, config_dict
from gateway.upstream import ServerThread, UpstreamState, start_upstream

from ferry.gateway.config import parse_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Stack:
    gateway: GatewayHarness
    onprem: tuple[UpstreamState, ServerThread]
    cloud: tuple[UpstreamState, ServerThread]

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Shared by a module's tests (each uses keys of its own): a gateway start costs a second."""
    onprem = start_upstream("onprem-a")
    cloud = start_upstream("cloud-a")
    db = f"sqlite:///{tmp_path_factory.mktemp('console')}/gateway.db"
    backends = [backend("onprem-a", onprem[1], "onprem"), backend("cloud-a", cloud[1], "cloud", kind="openai")]
    gw = GatewayHarness(parse_config(config_dict(backends, db)))
    try:
        yield Stack(gw, onprem, cloud)
    finally:
        gw.close()
        onprem[1].stop()
        cloud[1].stop()


# NOTE: module scope, not session: Playwright's sync API keeps an event loop running on this thread
# until it stops, and every later test that starts its own loop (asyncio.run, anyio) would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: the console's browser tests need Debian's chromium "
                    "(apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) whose page fails the test on any console error: a
    Content-Security-Policy violation, a script that did not load, an exception."""
    context = browser.new_context(accept_downloads=True)
    context.set_default_timeout(10_000)
    p = context.new_page()
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    # NOTE: the 4xx pages tests ask for on purpose (a refused form, a wrong key) log a line each.
    real = [e for e in errors if not re.search(r"status of 40[0134]", e)]
    assert not real, f"browser console errors: {real}"


def login(page: Any, url: str, key: str = MASTER) -> None:
    page.goto(url + "/ui/login")
    page.fill("input[name=master_key]", key)
    page.click("button:has-text('Log in')")


def http_session(url: str) -> tuple[httpx.Client, str]:
    """Log in over plain HTTP: a client holding the session cookie, and the session's CSRF token."""
    c = httpx.Client(base_url=url, timeout=10)
    form = c.get("/ui/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    r = c.post("/ui/login", data={"csrf_token": token, "master_key": MASTER})
    assert r.status_code == 303 and r.headers["location"] == "/ui", r.text
    keys = c.get("/ui/keys").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', keys).group(1)  # type: ignore[union-attr]
    return c, csrf
