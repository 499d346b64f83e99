"""Backends are `unknown` until they first answer: /health, the metrics and routing say so; a backend whose host
does not resolve or whose port is closed goes unknown -> down at its first health check, a healthy one -> up."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from gateway.conftest import ENV, backend, config_dict
from gateway.upstream import bind_free_port

from ferry.gateway.app import create_app
from ferry.gateway.config import parse_config

MSG = [{"role": "user", "content": "hello"}]


def _closed_port() -> int:
    sock = bind_free_port()
    port = sock.getsockname()[1]
    sock.close()  # NOTE: nothing listens there now: a connect is refused at once
    return int(port)


def _health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health").json()["backends"]


def _metric(url: str, line: str) -> bool:
    return line in httpx.get(url + "/metrics").text


async def test_first_health_check_decides_unknown_to_up_or_down(upstreams, tmp_path) -> None:
    _, srv = upstreams("rack")
    backends = [backend("rack", srv, "onprem"),
                {"name": "nowhere", "url": "http://ferry-test.invalid:8000/v1", "location": "onprem",
                 "connect_timeout": 1},
                {"name": "closed", "url": f"http://127.0.0.1:{_closed_port()}/v1", "location": "onprem",
                 "connect_timeout": 1}]
    app = create_app(parse_config(config_dict(backends, f"sqlite:///{tmp_path}/gw.db")), ENV)
    gw = app.state.gateway
    try:
        assert {n: gw.states.state(b) for n, b in gw.backends.items()} == {
            "rack": "unknown", "nowhere": "unknown", "closed": "unknown"}
        await gw.monitor.check_once()
        # one failed check is below the circuit's threshold, yet a backend that never answered is down
        assert {n: gw.states.state(b) for n, b in gw.backends.items()} == {
            "rack": "up", "nowhere": "down", "closed": "down"}
        assert gw.backends["closed"].up  # its circuit is still closed: routing may still try it, last
    finally:
        for b in gw.backends.values():
            await b.aclose()
        gw.engine.dispose()


def test_health_metrics_and_routing_say_unknown(upstreams, gateway) -> None:
    gate = threading.Event()
    _, srv_rack = upstreams("rack", models_gate=gate)  # its health check hangs until the gate opens
    cloud, srv_cloud = upstreams("cloud")
    closed = {"name": "closed", "url": f"http://127.0.0.1:{_closed_port()}/v1", "location": "onprem",
              "connect_timeout": 1, "max_concurrency": 4}
    try:
        gw = gateway([backend("rack", srv_rack, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai"),
                      closed], health={"timeout": 30, "interval": 0.1})
        # NOTE: one health round checks every backend at once and ends with its slowest: cloud's and
        # closed's first checks end while rack's waits at the gate
        gw.wait_for(lambda: _health(gw.url)["cloud"]["state"] == "up", what="cloud up")
        gw.wait_for(lambda: _health(gw.url)["closed"]["state"] == "down", what="closed down")
        health = _health(gw.url)
        assert health["rack"]["state"] == "unknown" and health["rack"]["up"] is False
        assert health["closed"]["up"] is False and health["cloud"]["up"] is True
        assert _metric(gw.url, 'ferry_gateway:backend_state{backend="rack",location="onprem",state="unknown"} 1.0')
        assert _metric(gw.url, 'ferry_gateway:backend_up{backend="rack",location="onprem"} 0.0')
        assert _metric(gw.url, 'ferry_gateway:backend_state{backend="closed",location="onprem",state="down"} 1.0')
        key = gw.create_key()
        headers = {"Authorization": f"Bearer {key}"}
        # public data: the known-up cloud beats the unknown on-prem rack, which on-prem-first would pick
        r = httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                       json={"model": "chat", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-ferry-backend"] == "cloud"
        assert r.headers["x-ferry-backend-state"] == "up" and r.headers["x-ferry-overflow"] == "1"
        # restricted data: nothing known up may take it, so the unknown rack is tried, and the answer says so
        r = httpx.post(gw.url + "/v1/chat/completions", headers={**headers, "x-ferry-data-class": "restricted"},
                       json={"model": "chat", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-ferry-backend"] == "rack"
        assert r.headers["x-ferry-backend-state"] == "unknown"
        # a request it answered proves it up, before any health check did
        assert _health(gw.url)["rack"]["state"] == "up"
        assert [row["backend"] for row in gw.ledger()] == ["cloud", "rack"] and cloud.requests == 1
    finally:
        gate.set()
