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


async def _burst(url: str, secrets: list[str], max_tokens: int = 8) -> list[int]:
    """All requests at once; their HTTP statuses in order."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        rs = await asyncio.gather(*(http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {s}"},
                                              json={"model": "chat", "messages": MSG, "max_tokens": max_tokens})
                                    for s in secrets))
    return [r.status_code for r in rs]


async def test_a_concurrent_burst_is_held_to_tpm_by_reservations(upstreams, gateway) -> None:
    # NOTE: the upstream holds each answer, so the whole burst is admitted before any usage is recorded:
    # only the reservations (4 prompt + 8 completion = 12 tokens each) can stop it.
    up, srv = upstreams("rack", delay=1.0)
    gw = gateway([backend("rack", srv, "onprem")])
    secret = gw.create_key(name="t", tpm=20)
    statuses = await _burst(gw.url, [secret] * 5)
    assert sorted(statuses) == [200, 200, 429, 429, 429]  # 0 -> 12 -> 24 reserved: the third is over
    assert up.requests == 2
    rows = [r for r in gw.ledger() if r["status"] == 200]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(2, 8), (2, 8)]  # settled to actual


async def test_a_concurrent_burst_is_held_to_key_and_team_budgets(upstreams, gateway) -> None:
    up, srv = upstreams("rack", delay=1.0)
    # $0.1 per token: a request reserves 12 tokens = $1.20 and then costs 10 tokens = $1.00
    gw = gateway([backend("rack", srv, "onprem", input_per_mtok=1e5, output_per_mtok=1e5)],
                 teams={"ml": {"budget_usd": 1.5}})
    solo = gw.create_key(name="solo", budget_usd=1.5)
    assert sorted(await _burst(gw.url, [solo] * 4)) == [200, 200, 429, 429]
    m1, m2 = gw.create_key(name="m1", team="ml"), gw.create_key(name="m2", team="ml")
    assert sorted(await _burst(gw.url, [m1, m2, m1, m2])) == [200, 200, 429, 429]
    assert up.requests == 4
    spent = sum(r["cost_usd"] for r in gw.ledger())
    assert spent == pytest.approx(4.0)  # reservations settled to the actual cost


def test_estimate_and_dearest_prices() -> None:
    from ferry.gateway.config import parse_config
    from ferry.gateway.limits import DEFAULT_CHAT_COMPLETION_TOKENS, dearest_prices, estimate
    from gateway.conftest import config_dict

    e = estimate({"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 10, "n": 2}, "chat/completions",
                 1e6, 2e6)
    assert (e.prompt_tokens, e.completion_tokens, e.cost_usd) == (11, 20, pytest.approx(11 + 40))
    assert estimate({"messages": MSG}, "chat/completions", 0, 0).completion_tokens == DEFAULT_CHAT_COMPLETION_TOKENS
    assert estimate({"prompt": [[1, 2], [3]]}, "completions", 0, 0) == estimate({"prompt": "abcdefghijk"},
                                                                                 "completions", 0, 0)
    cfg = parse_config(config_dict([{"name": "rack", "url": "http://rack/v1", "location": "onprem",
                                     "input_per_mtok": 0.05, "output_per_mtok": 0.1},
                                    {"name": "cloud", "url": "http://cloud/v1", "location": "cloud",
                                     "input_per_mtok": 0.15, "output_per_mtok": 0.6}], "sqlite://"))
    route = cfg.model("chat")
    assert dearest_prices(cfg, route, ("onprem", "cloud")) == (0.15, 0.6)
    assert dearest_prices(cfg, route, ("onprem",)) == (0.05, 0.1)  # a restricted request never reaches the cloud


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
