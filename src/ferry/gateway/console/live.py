"""The backends' live state as the gateway sees it now: health, circuit, load, scraped signals."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ferry.gateway.backends import Backend
from ferry.gateway.state import Gateway


@dataclass(frozen=True)
class BackendView:
    name: str
    kind: str
    location: str
    state: str  # unknown | up | down, as /health says (health.BackendStates)
    circuit: str  # closed | open | half-open
    circuit_detail: str  # failure counts, how long open
    inflight: int
    max_concurrency: int
    saturated: bool
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None  # 0..1


def _circuit(backend: Backend, now: float) -> tuple[str, str]:
    b = backend.breaker
    counts = f"{b.failures} request / {b.health_failures} health failures in a row"
    if b.opened_at is not None:
        ago = max(0.0, now - b.opened_at)
        return "open", f"open for {ago:.0f} s (cooldown {b.cooldown:g} s); {counts}"
    if b.half_open:
        return "half-open", f"on probation: the next request failure opens it again; {counts}"
    return "closed", counts


def backend_views(gw: Gateway) -> list[BackendView]:
    now = time.monotonic()  # NOTE: the breaker's clock
    out = []
    for b in gw.backends.values():
        circuit, detail = _circuit(b, now)
        s = b.signals
        out.append(BackendView(name=b.name, kind=b.config.kind, location=b.location, state=gw.states.state(b),
                               circuit=circuit, circuit_detail=detail, inflight=b.inflight,
                               max_concurrency=b.config.max_concurrency, saturated=gw.router.saturated(b),
                               running=s.running, waiting=s.waiting, kv_cache_usage=s.kv_cache_usage))
    return out


@dataclass(frozen=True)
class DatabaseView:
    name: str
    up: bool
    error: str | None
    down_since: float | None
    waiting_writes: int


def database_view(gw: Gateway) -> DatabaseView:
    return DatabaseView(name=gw.database_name, up=gw.database.cause is None, error=gw.database.cause,
                        down_since=gw.database.down_since, waiting_writes=gw.ledger.backlog)
