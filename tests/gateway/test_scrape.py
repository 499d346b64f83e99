"""Load-signal scrapes of ferry backends: a /metrics page that is not Prometheus text fails that scrape only."""

from __future__ import annotations

import httpx

from ferry.gateway.backends import make_backend
from ferry.gateway.backends.base import LoadSignals
from ferry.gateway.config import BackendConfig, HealthConfig
from ferry.gateway.health import HealthMonitor

GOOD = 'ferry:num_requests_waiting{model_name="m"} 3\nferry:kv_cache_usage_perc{model_name="m"} 0.5\n'


async def test_a_non_prometheus_metrics_page_resets_signals_and_the_monitor_goes_on() -> None:
    pages = {"good": GOOD, "bad": GOOD}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=pages[request.url.host])

    transport = httpx.MockTransport(handler)
    backends = [make_backend(BackendConfig(name=n, url=f"http://{n}/v1", kind="ferry"), HealthConfig(), {},
                             transport) for n in ("bad", "good")]
    changes: list[int] = []
    monitor = HealthMonitor(backends, HealthConfig(), 1.0, lambda: changes.append(1))
    await monitor.scrape_once()
    assert [b.signals.waiting for b in backends] == [3.0, 3.0]

    pages["bad"] = "<html><body>Welcome to nginx!</body></html>"
    await monitor.scrape_once()  # must not raise: that would end the scrape loop (or the start-up)
    assert backends[0].signals == LoadSignals()
    assert backends[1].signals == LoadSignals(waiting=3.0, kv_cache_usage=0.5)
    assert len(changes) == 4
    for b in backends:
        await b.aclose()


async def test_an_unforeseen_error_costs_one_round_not_the_loops(caplog) -> None:
    import asyncio
    import logging

    calls = {"models": 0, "metrics": 0}
    done = asyncio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        kind = "metrics" if request.url.path.endswith("/metrics") else "models"
        calls[kind] += 1
        if min(calls.values()) >= 3:
            done.set()
        if calls[kind] <= 2:
            raise RuntimeError(f"boom in {kind}")  # not an httpx error: escapes the backend as-is
        return httpx.Response(200, text=GOOD if kind == "metrics" else '{"data": []}')

    backend = make_backend(BackendConfig(name="b", url="http://b/v1", kind="ferry"), HealthConfig(), {},
                           httpx.MockTransport(handler))
    monitor = HealthMonitor([backend], HealthConfig(interval=0.01), 0.01, lambda: None)
    with caplog.at_level(logging.ERROR, logger="ferry.gateway"):
        monitor.start()
        try:
            await asyncio.wait_for(done.wait(), timeout=10)
        finally:
            await monitor.stop()
            await backend.aclose()
    assert min(calls.values()) >= 3
    assert backend.signals == LoadSignals(waiting=3.0, kv_cache_usage=0.5)
    failed = [r for r in caplog.records if r.exc_info]
    assert {r.getMessage() for r in failed} == {"health check round failed", "metrics scrape round failed"}
