"""On-prem first with overflow at saturation, drain back, and data classes that never leave their locations."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from gateway.conftest import backend

MSG = [{"role": "user", "content": "hello there"}]


def _ask(client, **kw):
    r = client.chat.completions.with_raw_response.create(model="chat", messages=kw.pop("messages", MSG),
                                                         max_tokens=kw.pop("max_tokens", 4), **kw)
    return r.headers["x-ferry-backend"], r.parse()


def test_light_load_stays_on_prem(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack")
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai")])
    client = gw.openai(gw.create_key())
    for _ in range(6):
        assert _ask(client)[0] == "rack"
    assert (onprem.completed, cloud.requests) == (6, 0)
    assert {r["location"] for r in gw.ledger()} == {"onprem"} and not any(r["overflow"] for r in gw.ledger())
    # the cloud backend got the gateway's configured API key; on-prem got none
    assert all(r["backend"] == "rack" for r in gw.ledger())


def test_saturation_overflows_to_cloud_at_once_and_drains_back(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack", delay=1.5)  # slow enough that all six overlap
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem", max_concurrency=2),
                  backend("cloud", srv_cloud, "cloud", kind="openai", max_concurrency=16)])
    client = gw.openai(gw.create_key())
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _ask(client, stream=False), range(6)))
    assert all(r[1].choices[0].message.content for r in results)  # no failed request
    by_backend = [b for b, _ in results]
    assert by_backend.count("rack") >= 2 and by_backend.count("cloud") >= 1
    assert onprem.max_running <= 2  # never past max_concurrency on-prem
    rows = [r for r in gw.ledger() if r["status"] == 200]
    assert all(r["overflow"] == (r["location"] == "cloud") for r in rows)
    # overflow went out at once: no attempt on-prem first, no error before it
    assert all(r["attempts"] == 1 for r in rows)
    metrics = httpx.get(gw.url + "/metrics").text
    assert f"ferry_gateway:overflow_total {float(by_backend.count('cloud'))}" in metrics
    # room again: the next requests drain back on-prem
    onprem.delay = 0.0
    before = cloud.requests
    for _ in range(3):
        assert _ask(client)[0] == "rack"
    assert cloud.requests == before


def test_scraped_queue_and_kv_usage_trigger_overflow(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack", forced_waiting=3)
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai")],
                 routing={"overflow": {"max_waiting": 2, "max_kv_cache_usage": 0.9}})
    client = gw.openai(gw.create_key())
    # the gateway has nothing in flight on-prem, but the replica's own queue says it is saturated
    assert _ask(client)[0] == "cloud"
    onprem.forced_waiting = 0
    gw.wait_for(lambda: gw.gw.backends["rack"].signals.waiting == 0, what="scrape of waiting=0")
    assert _ask(client)[0] == "rack"
    onprem.forced_kv_usage = 0.95
    gw.wait_for(lambda: gw.gw.backends["rack"].signals.kv_cache_usage == 0.95, what="scrape of KV usage")
    assert _ask(client)[0] == "cloud"
    assert [r["overflow"] for r in gw.ledger()] == [True, False, True]


def test_restricted_and_pii_never_reach_the_cloud_even_when_on_prem_is_saturated(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack", token_delay=0.05)
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem", max_concurrency=1),
                  backend("cloud", srv_cloud, "cloud", kind="openai")],
                 routing={"queue_timeout": 20})
    public = gw.openai(gw.create_key(name="pub"))
    restricted = gw.openai(gw.create_key(name="sec", data_class="restricted"))
    pii_msgs = [[{"role": "user", "content": "mail me at jane.doe@example.com"}],
                [{"role": "user", "content": "card 4111 1111 1111 1111 please"}],
                [{"role": "user", "content": "my IBAN is DE89 3704 0044 0532 0130 00"}]]

    def job(i: int):
        if i % 3 == 0:
            return "key", _ask(restricted)[0]
        if i % 3 == 1:
            return "pii", _ask(public, messages=pii_msgs[i // 3])[0]
        return "header", _ask(public, extra_headers={"x-ferry-data-class": "restricted"})[0]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(job, range(9)))
    # on-prem holds one at a time, so these queued for it instead of overflowing
    assert all(b == "rack" for _, b in results)
    assert cloud.requests == 0 and onprem.max_running == 1
    rows = gw.ledger()
    assert all(r["data_class"] == "restricted" and r["location"] == "onprem" for r in rows)
    assert sorted(r["pii_kinds"] for r in rows if r["pii"]) == ["card", "email", "iban"]
    # meanwhile public traffic did overflow: the cloud is there, restricted data just may not use it
    onprem.token_delay = 0.3
    with ThreadPoolExecutor(3) as pool:
        public_backends = list(pool.map(lambda _: _ask(public)[0], range(3)))
    assert "cloud" in public_backends


def test_header_only_tightens(upstreams, gateway) -> None:
    _, srv_on = upstreams("rack")
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem", max_concurrency=1),
                  backend("cloud", srv_cloud, "cloud", kind="openai")],
                 routing={"policy": "lowest-cost"})
    secret = gw.openai(gw.create_key(name="sec", data_class="restricted"))
    r = secret.chat.completions.with_raw_response.create(
        model="chat", messages=MSG, extra_headers={"x-ferry-data-class": "public"})
    assert r.headers["x-ferry-data-class"] == "restricted" and r.headers["x-ferry-location"] == "onprem"
    with pytest.raises(openai.BadRequestError):
        secret.chat.completions.create(model="chat", messages=MSG, extra_headers={"x-ferry-data-class": "nope"})
    assert cloud.requests == 0
    assert [r["status"] for r in gw.ledger()] == [200, 400]  # the refusal is a ledger row too


def test_restricted_with_on_prem_down_gets_503_naming_the_reason(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack")
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai")],
                 routing={"queue_timeout": 0.5})
    srv_on.stop()
    gw.wait_for(lambda: not gw.gw.backends["rack"].up, what="health checks to open the circuit")
    client = gw.openai(gw.create_key())
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "SSN 123-45-6789"}])
    assert e.value.status_code == 503
    assert "rack: down" in e.value.message and "restricted" in e.value.message and "national_id" in e.value.message
    # public traffic still flows, to the cloud
    assert _ask(client)[0] == "cloud"
    assert cloud.requests == 1
    row = [r for r in gw.ledger() if r["status"] == 503][0]
    assert row["data_class"] == "restricted" and row["backend"] is None and "unavailable" in row["reason"]
    assert 'ferry_gateway:blocked_total{reason="unavailable"} 1.0' in httpx.get(gw.url + "/metrics").text


def test_no_allowed_deployment_is_503_at_once(upstreams, gateway) -> None:
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("cloud", srv_cloud, "cloud", kind="openai")], routing={"queue_timeout": 30})
    client = gw.openai(gw.create_key(data_class="restricted"))
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="chat", messages=MSG)
    assert e.value.status_code == 503 and "no deployment in onprem" in e.value.message
    assert time.monotonic() - t0 < 30  # did not sit out the queue timeout
    assert cloud.requests == 0
