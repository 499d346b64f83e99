"""The admin console driven in Debian's Chromium: login, live backends, keys, ledger, CSV, charts."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway.conftest import MASTER
from gateway_console.conftest import Stack, login

pytestmark = pytest.mark.timeout(120)


def chat(stack: Stack, key: str, text: str = "hello there") -> Any:
    return stack.gateway.openai(key).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": text}], max_tokens=3)


def test_without_a_session_every_page_is_the_login_page(stack: Stack, page: Any) -> None:
    for path in ("/ui", "/ui/ledger?key=x", "/ui/keys", "/ui/usage", "/ui/traffic"):
        page.goto(stack.url + path)
        assert page.url == stack.url + "/ui/login"
        assert page.locator("input[name=master_key]").get_attribute("type") == "password"
    assert all(c["name"] != "ferry_console" for c in page.context.cookies())


def test_wrong_master_key_is_an_error_on_the_form(stack: Stack, page: Any) -> None:
    login(page, stack.url, "not-the-master-key")
    assert page.url == stack.url + "/ui/login"
    assert page.get_by_role("alert").inner_text() == "That is not the gateway's master key."
    assert all(c["name"] != "ferry_console" for c in page.context.cookies())
    page.goto(stack.url + "/ui/keys")
    assert page.url == stack.url + "/ui/login"


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(stack: Stack, page: Any) -> None:
    login(page, stack.url)
    assert page.url == stack.url + "/ui"
    assert page.locator("#backends tr[data-backend=onprem-a]").count() == 1
    cookie = next(c for c in page.context.cookies() if c["name"] == "ferry_console")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == (True, "Strict", "/ui", False)
    assert MASTER not in page.url and page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    page.click("button:has-text('Log out')")
    assert page.url == stack.url + "/ui/login"
    # NOTE: the old cookie put back by hand must not work either: the session is gone server-side.
    page.context.add_cookies([cookie])
    page.goto(stack.url + "/ui/keys")
    assert page.url == stack.url + "/ui/login"


def test_a_backend_goes_down_and_comes_back_without_reloading(stack: Stack, page: Any) -> None:
    login(page, stack.url)
    state = page.locator("tr[data-backend=onprem-a] [data-state]")
    circuit = page.locator("tr[data-backend=onprem-a] [class*=badge-circuit]")
    assert state.get_attribute("data-state") == "up"
    page.evaluate("window.stillTheSamePage = true")
    server = stack.onprem[1]
    server.stop()
    try:
        page.wait_for_selector("tr[data-backend=onprem-a] [data-state=down]", timeout=15_000)
        assert circuit.inner_text() == "open"
    finally:
        server.start()
    page.wait_for_selector("tr[data-backend=onprem-a] [data-state=up]", timeout=15_000)
    assert circuit.inner_text() in ("half-open", "closed")
    assert page.evaluate("window.stillTheSamePage") is True  # htmx polling, not a reload
    assert page.locator("tr[data-backend=cloud-a] [data-state]").get_attribute("data-state") == "up"


def test_create_use_set_limits_and_revoke_a_key(stack: Stack, page: Any) -> None:
    login(page, stack.url)
    page.goto(stack.url + "/ui/keys")
    page.fill("#create-key input[name=name]", "browser-key")
    page.fill("#create-key input[name=team]", "web")
    page.fill("#create-key input[name=budget_usd]", "2.5")
    page.click("#create-key button")
    secret = page.locator("#new-key-secret").inner_text()
    assert secret.startswith("sk-ferry-")
    row = page.locator("tr[data-key-name=browser-key]")
    key_id = row.get_attribute("data-key-id")
    listed = stack.gateway.admin.get("/admin/keys").json()["data"]
    assert [(k["team"], k["budget_usd"]) for k in listed if k["id"] == key_id] == [("web", 2.5)]

    assert chat(stack, secret).choices[0].message.content  # 200 with the new key

    # the admin API's own checks: a zero RPM is refused with its message, nothing changes
    page.goto(stack.url + "/ui/keys")
    row = page.locator(f"tr[data-key-id='{key_id}']")
    row.locator("input[name=rpm]").fill("0")
    row.locator("button:has-text('Save')").click()
    assert "rpm: must be a positive integer or null" in page.get_by_role("alert").inner_text()
    row = page.locator(f"tr[data-key-id='{key_id}']")
    row.locator("input[name=rpm]").fill("1")
    row.locator("button:has-text('Save')").click()
    assert "budget and limits saved" in page.get_by_role("status").inner_text()
    assert [k["rpm"] for k in stack.gateway.admin.get("/admin/keys").json()["data"] if k["id"] == key_id] == [1]
    with pytest.raises(openai.RateLimitError):  # the one request of this minute was the one above
        chat(stack, secret)

    page.on("dialog", lambda d: d.accept())  # the revoke button asks first
    page.locator(f"tr[data-key-id='{key_id}'] button:has-text('Revoke')").click()
    assert "revoked" in page.get_by_role("status").inner_text()
    assert page.locator(f"tr[data-key-id='{key_id}']").count() == 0
    with pytest.raises(openai.AuthenticationError) as e:
        chat(stack, secret)
    assert e.value.status_code == 401


def test_a_request_appears_in_the_ledger_and_exports_as_csv(stack: Stack, page: Any) -> None:
    secret = stack.gateway.create_key(name="=ledger-key", team="csv")
    for text in ("one", "two words", "three more words"):
        chat(stack, secret, text)
    rows = [r for r in stack.gateway.ledger() if r["key_name"] == "=ledger-key"]
    assert len(rows) == 3
    login(page, stack.url)
    page.goto(stack.url + "/ui/ledger")
    page.fill("#ledger-filters input[name=key]", "=ledger-key")
    page.select_option("#ledger-filters select[name=status]", "ok")
    page.click("#ledger-filters button:has-text('Filter')")
    assert "key=%3Dledger-key" in page.url and "status=ok" in page.url
    shown = [int(x) for x in page.locator("#ledger tr[data-row-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.rowId)")]
    assert shown == sorted((r["id"] for r in rows), reverse=True)
    assert page.locator(f"#ledger tr[data-row-id='{rows[0]['id']}'] td").nth(5).inner_text() == rows[0]["backend"]

    with page.expect_download() as got:
        page.click("#csv-export")
    download = got.value
    assert download.suggested_filename == "ferry-ledger.csv"
    text = Path(download.path()).read_text(encoding="utf-8")
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["id"]) for r in exported] == sorted((r["id"] for r in rows), reverse=True)
    assert {r["key_name"] for r in exported} == {"'=ledger-key"}  # defused: no spreadsheet formula
    assert [int(r["prompt_tokens"]) for r in exported] == [r["prompt_tokens"] for r in reversed(rows)]


def test_traffic_and_usage_pages_draw_their_charts(stack: Stack, page: Any) -> None:
    secret = stack.gateway.create_key(name="chart-key", team="charts")
    chat(stack, secret)
    stack.gateway.ledger()
    login(page, stack.url)
    page.goto(stack.url + "/ui/traffic?period=1h")
    page.wait_for_function("() => typeof Chart !== 'undefined' && "
                           "[...document.querySelectorAll('canvas[data-chart]')].every(c => Chart.getChart(c))")
    onprem = page.evaluate("Chart.getChart(document.getElementById('routing-chart')).data.datasets[0].data")
    assert sum(onprem) >= 1
    assert page.locator("#decisions td:text-is('public')").count() == 1
    page.goto(stack.url + "/ui/usage?period=1h")
    page.wait_for_function("() => typeof Chart !== 'undefined' && "
                           "[...document.querySelectorAll('canvas[data-chart]')].every(c => Chart.getChart(c))")
    assert page.locator("#usage-key td:text-is('chart-key')").count() == 1
    assert page.locator("#usage-team td:text-is('charts')").count() == 1
    assert page.locator("#usage-backend td:text-is('onprem-a')").count() == 1
    labels = page.evaluate("Chart.getChart(document.querySelector('#usage-key canvas')).data.labels")
    assert "chart-key" in labels
