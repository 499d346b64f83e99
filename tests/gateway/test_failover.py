"""Failover before the first token, circuit breaker out and health checks back, client disconnects."""

from __future__ import annotations

import httpx
import openai
import pytest
from gateway.conftest import backend

MSG = [{"role": "user", "content": "failover please"}]


def _backend_of(client, **kw) -> str:
    r = client.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=4, **kw)
    return r.headers["x-ferry-backend"]


def test_connect_error_5xx_and_timeout_fail_over(upstreams, gateway) -> None:
    a, srv_a = upstreams("a")
    b, srv_b = upstreams("b")
    gw = gateway([backend("a", srv_a, "onprem", timeout=0.5), backend("b", srv_b, "onprem")],
                 health={"interval": 30, "failure_threshold": 100})  # keep the circuit out of this test
    client = gw.openai(gw.create_key())
    a.fail_status = 503
    assert _backend_of(client) == "b"
    a.fail_status, a.delay = None, 3.0  # slower than a's timeout, before the first byte
    assert _backend_of(client) == "b"
    assert _backend_of(client, stream=True) == "b"
    a.delay = 0.0
    srv_a.stop()  # connection refused
    assert _backend_of(client) == "b"
    rows = gw.ledger()
    assert [r["attempts"] for r in rows] == [2, 2, 2, 2] and all(r["status"] == 200 for r in rows)
    assert "HTTP 503" in rows[0]["reason"] and "timeout" in rows[1]["reason"] and "connect" in rows[3]["reason"]
    assert b.completed == 4


def test_stream_that_breaks_before_its_first_token_fails_over(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", break_stream_before_token=True)
    b, srv_b = upstreams("b")
    gw = gateway([backend("a", srv_a, "onprem"), backend("b", srv_b, "onprem")])
    client = gw.openai(gw.create_key())
    chunks = list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=5, stream=True))
    direct = openai.OpenAI(base_url=srv_b.url + "/v1", api_key="x", max_retries=0)
    ref = direct.chat.completions.create(model="b-model", messages=MSG, max_tokens=5)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.choices[0].message.content
    assert a.requests == 1 and gw.ledger()[0]["backend"] == "b"


def test_all_attempts_failing_is_502_in_openai_shape(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", fail_status=500)
    b, srv_b = upstreams("b", fail_status=502)
    # NOTE: health checks every 0.1 s would open both circuits before a slow machine sends the request
    # (a 503 "circuit open" instead of the attempts' 502): here only the request's attempts may fail.
    gw = gateway([backend("a", srv_a, "onprem"), backend("b", srv_b, "onprem")], health={"interval": 60})
    with pytest.raises(openai.InternalServerError) as e:
        gw.openai(gw.create_key()).chat.completions.create(model="chat", messages=MSG)
    assert e.value.status_code == 502 and "HTTP 500" in e.value.message and "HTTP 502" in e.value.message
    assert gw.ledger()[0]["status"] == 502


def test_circuit_opens_after_n_failures_and_health_checks_bring_it_back(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", fail_status=500)
    b, srv_b = upstreams("b")
    # NOTE: a cooldown long enough that a loaded machine's five requests end before the circuit half-opens
    gw = gateway([backend("a", srv_a, "onprem"), backend("b", srv_b, "onprem")],
                 health={"interval": 0.1, "failure_threshold": 2, "cooldown": 3.0})
    client = gw.openai(gw.create_key())
    for _ in range(5):
        assert _backend_of(client) == "b"
    # two failures (of requests or of health checks, whichever came first) open a's circuit, and
    # no request went there after that (a fast machine sends all five before the second check)
    gw.wait_for(lambda: not gw.gw.backends["a"].up, what="a's circuit to open")
    assert a.requests <= 2
    assert 'ferry_gateway:backend_up{backend="a",location="onprem"} 0.0' in httpx.get(gw.url + "/metrics").text
    a.fail_status = None
    gw.wait_for(lambda: gw.gw.backends["a"].up, what="health check to close a's circuit")
    assert _backend_of(client) == "a"


def test_killed_on_prem_backend_fails_over_within_allowed_locations_and_comes_back(upstreams, gateway) -> None:
    a, srv_a = upstreams("a")
    b, srv_b = upstreams("b")
    cloud, srv_c = upstreams("cloud")
    gw = gateway([backend("a", srv_a, "onprem"), backend("b", srv_b, "onprem"),
                  backend("cloud", srv_c, "cloud", kind="openai")])
    restricted = gw.openai(gw.create_key(data_class="restricted"))
    assert _backend_of(restricted) == "a"
    srv_a.stop()
    assert [_backend_of(restricted) for _ in range(4)] == ["b"] * 4
    gw.wait_for(lambda: not gw.gw.backends["a"].up, what="a to be marked down")
    srv_a.start()  # same port
    gw.wait_for(lambda: gw.gw.backends["a"].up, what="a to come back")
    assert _backend_of(restricted) == "a"
    assert cloud.requests == 0


def test_client_disconnect_mid_stream_cancels_upstream(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", token_delay=0.2)
    gw = gateway([backend("a", srv_a, "onprem")])
    key = gw.create_key()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": MSG, "max_tokens": 200, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        assert a.running == 1
    # the client is gone: the upstream request ends long before its 200 tokens, and the slot frees
    gw.wait_for(lambda: a.running == 0 and a.cancelled == 1, what="upstream cancel")
    gw.wait_for(lambda: gw.gw.backends["a"].inflight == 0, what="gateway slot release")
    gw.wait_for(lambda: gw.ledger(settled=False)[0]["status"] == 499, what="ledger row")
    assert a.completed == 0


def test_client_disconnect_before_the_response_cancels_upstream(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", delay=10)
    gw = gateway([backend("a", srv_a, "onprem")])
    key = gw.create_key()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "chat", "messages": MSG}, timeout=httpx.Timeout(0.5))
    gw.wait_for(lambda: a.cancelled == 1 and a.running == 0, what="upstream cancel")
    gw.wait_for(lambda: gw.ledger(settled=False)[0]["status"] == 499, what="ledger row")
    assert gw.gw.backends["a"].inflight == 0


def test_client_disconnect_while_queued_never_reaches_upstream(upstreams, gateway) -> None:
    a, srv_a = upstreams("a", token_delay=0.5)
    gw = gateway([backend("a", srv_a, "onprem", max_concurrency=1)], routing={"queue_timeout": 30})
    key = gw.create_key()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", gw.url + "/v1/chat/completions", headers=headers,
                         json={"model": "chat", "messages": MSG, "stream": True}):
            gw.wait_for(lambda: a.running == 1, what="the slot to be taken")
            with pytest.raises(httpx.ReadTimeout):  # queued behind it, then gone
                httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                           json={"model": "chat", "messages": MSG}, timeout=httpx.Timeout(0.5))
            gw.wait_for(lambda: any(r["status"] == 499 for r in gw.ledger(settled=False)), what="ledger row")
            assert a.requests == 1
    queued = gw.ledger(settled=False)[1]
    assert (queued["status"], queued["backend"], queued["attempts"]) == (499, None, 0)
