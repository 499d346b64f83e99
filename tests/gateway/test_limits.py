"""RPM/TPM per key, USD budgets per key and team, 429s in OpenAI's shape, shared across gateway instances.

PostgreSQL runs when ``FERRY_TEST_POSTGRES_URL`` points at a database these tests may wipe
(``.ci/run`` starts one); SQLite, the embedded default, always runs.
"""

from __future__ import annotations

import os

import openai
import pytest
from gateway.conftest import backend

MSG = [{"role": "user", "content": "hello there"}]  # 2 prompt tokens upstream; max_tokens 8 -> 10 tokens


def _ok(client) -> None:
    client.chat.completions.create(model="chat", messages=MSG, max_tokens=8)


def test_rpm_gives_429_with_retry_after_at_the_right_request(upstreams, gateway) -> None:
    up, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = gw.openai(gw.create_key(name="r", rpm=3))
    for _ in range(3):
        _ok(client)
    with pytest.raises(openai.RateLimitError) as e:
        _ok(client)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.body["code"] == "rate_limit_exceeded" and "3 requests per minute" in e.value.message
    assert up.requests == 3
    assert [r["status"] for r in gw.ledger()] == [200, 200, 200, 429]
    # another key is not affected
    _ok(gw.openai(gw.create_key(name="other", rpm=3)))


def test_tpm_counts_upstream_usage(upstreams, gateway) -> None:
    up, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = gw.openai(gw.create_key(name="t", tpm=20))
    _ok(client)  # 10 tokens used
    _ok(client)  # 20 tokens used
    with pytest.raises(openai.RateLimitError) as e:
        _ok(client)
    assert "20 tokens per minute" in e.value.message and int(e.value.response.headers["retry-after"]) >= 1
    assert up.requests == 2


def test_key_and_team_budgets(upstreams, gateway) -> None:
    _, srv = upstreams("rack")
    # $0.1 per token in and out: each request costs 10 tokens = $1.00
    gw = gateway([backend("rack", srv, "onprem", input_per_mtok=1e5, output_per_mtok=1e5)],
                 teams={"ml": {"budget_usd": 1.5}})
    solo = gw.openai(gw.create_key(name="solo", budget_usd=2.5))
    for _ in range(3):
        _ok(solo)
    with pytest.raises(openai.RateLimitError) as e:
        _ok(solo)
    assert e.value.body["code"] == "budget_exceeded" and "solo" in e.value.message
    assert e.value.body["type"] == "insufficient_quota" and "retry-after" not in e.value.response.headers
    k1 = gw.openai(gw.create_key(name="m1", team="ml"))
    k2 = gw.openai(gw.create_key(name="m2", team="ml"))
    _ok(k1)
    _ok(k2)  # the team had spent $1 of $1.5
    with pytest.raises(openai.RateLimitError) as e:
        _ok(k1)
    assert "team 'ml'" in e.value.message
    costs = {r["key_name"]: 0.0 for r in gw.ledger()}
    for r in gw.ledger():
        costs[r["key_name"]] += r["cost_usd"]
    assert costs == pytest.approx({"solo": 3.0, "m1": 1.0, "m2": 1.0})


def _database_urls() -> list[object]:
    urls: list[object] = ["sqlite"]
    pg = os.environ.get("FERRY_TEST_POSTGRES_URL")
    urls.append(pg if pg else pytest.param(None, marks=pytest.mark.skip(
        reason="PostgreSQL not available: set FERRY_TEST_POSTGRES_URL=postgresql://user@host:port/db "
               "(a database these tests may wipe) to run the shared-limits test on PostgreSQL")))
    return urls


@pytest.mark.parametrize("database", _database_urls(), ids=["sqlite", "postgresql"])
def test_limits_and_ledger_are_shared_across_gateway_instances(upstreams, gateway, tmp_path, database) -> None:
    if database == "sqlite":
        url = f"sqlite:///{tmp_path}/shared.db"
    else:
        from ferry.gateway.db import make_engine, metadata

        url = database
        engine = make_engine(url)
        metadata.drop_all(engine)  # NOTE: a clean slate; the URL is documented as wipeable
        engine.dispose()
    up, srv = upstreams("rack")
    gw1 = gateway([backend("rack", srv, "onprem")], database=url, instance="one")
    gw2 = gateway([backend("rack", srv, "onprem")], database=url, instance="two")
    secret = gw1.create_key(name="shared", rpm=4)
    c1, c2 = gw1.openai(secret), gw2.openai(secret)  # a key made on one instance works on the other
    for c in (c1, c2, c1, c2):
        _ok(c)
    for c in (c1, c2):
        with pytest.raises(openai.RateLimitError):
            _ok(c)
    assert up.requests == 4
    rows = gw2.ledger()
    assert sorted(r["instance"] for r in rows if r["status"] == 200) == ["one", "one", "two", "two"]
    usage = gw1.admin.get("/admin/usage", params={"group_by": "key"}).json()["data"]
    assert usage[0]["group"] == "shared" and usage[0]["requests"] == 6 and usage[0]["ok"] == 4
    assert usage[0]["prompt_tokens"] == 8 and usage[0]["completion_tokens"] == 32
