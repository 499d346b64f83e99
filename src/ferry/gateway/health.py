"""The background loops that check backends' health and scrape their load signals.

Each result goes to the backend's circuit breaker (``circuit.py``, where the state diagram is); a
backend coming back wakes requests queued in the router (``on_change``).

What /health, the metrics and routing say of a backend (``BackendStates``):

    unknown  nothing answered yet: no health check finished, no request succeeded
    up       its circuit is closed and it has answered (a passing check or a successful request)
    down     its circuit is open, or it has never answered and its last health check failed

Routing still tries an unknown backend (and a never-answered one whose circuit is closed), as vLLM's
and LiteLLM's routers do, but only after every known-up candidate (``PreferKnownUp``); the answer says
which it was in ``x-ferry-backend-state``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ferry.gateway.backends import Backend, UpstreamError
from ferry.gateway.config import HealthConfig
from ferry.gateway.routing.base import Candidate, RoutingPolicy

log = logging.getLogger("ferry.gateway")
UNKNOWN, UP, DOWN = "unknown", "up", "down"
STATES = (UNKNOWN, UP, DOWN)


class BackendStates:
    """Which backends have answered and which have only failed their checks (see the module doc).

    NOTE: touched only on the event loop (health checks and the proxy), so it needs no lock.
    """

    def __init__(self) -> None:
        self._answered: set[str] = set()  # a health check passed or a request succeeded
        self._failed: set[str] = set()  # never answered, and the last health check failed

    def state(self, backend: Backend) -> str:
        if not backend.up:
            return DOWN
        if backend.name in self._answered:
            return UP
        return DOWN if backend.name in self._failed else UNKNOWN

    def answered(self, name: str) -> None:
        self._answered.add(name)
        self._failed.discard(name)

    def check_failed(self, name: str) -> None:
        if name not in self._answered:
            self._failed.add(name)


class PreferKnownUp(RoutingPolicy):
    """A policy's order, known-up backends first: an unproven one only when none of those can take it."""

    def __init__(self, inner: RoutingPolicy, states: BackendStates) -> None:
        self.inner = inner
        self.name = inner.name
        self._states = states

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        ordered = self.inner.order(candidates)
        return ([c for c in ordered if self._states.state(c.backend) == UP]
                + [c for c in ordered if self._states.state(c.backend) != UP])


class HealthMonitor:
    """Background tasks: health checks every ``interval``, /metrics scrapes every ``scrape_interval``."""

    def __init__(self, backends: Sequence[Backend], health: HealthConfig, scrape_interval: float,
                 on_change: Callable[[], None], states: BackendStates | None = None) -> None:
        self._backends = backends
        self.states = states or BackendStates()
        self._health = health
        self._scrape_interval = scrape_interval
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._health_loop(), name="ferry-gateway-health"))
        if any(b.config.scrape_url for b in self._backends):
            self._tasks.append(asyncio.create_task(self._scrape_loop(), name="ferry-gateway-scrape"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self._backends))

    async def scrape_once(self) -> None:
        await asyncio.gather(*(self._scrape(b) for b in self._backends if b.config.scrape_url))

    async def _check(self, backend: Backend) -> None:
        try:
            await backend.check_health()
        except UpstreamError as e:
            first = self.states.state(backend) == UNKNOWN
            self.states.check_failed(backend.name)
            if backend.breaker.health_failed():
                log.warning("backend %s is out: %s", backend.name, e)
            elif first:
                log.warning("backend %s is down at its first health check: %s", backend.name, e)
            return
        self.states.answered(backend.name)
        if backend.breaker.health_ok():
            log.info("backend %s is back", backend.name)
            self._on_change()

    async def _scrape(self, backend: Backend) -> None:
        try:
            await backend.scrape()
        except UpstreamError as e:
            log.debug("scrape failed: %s", e)
        self._on_change()

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                # NOTE: a failure we did not foresee (a bug, an odd answer) must cost one round, not
                # the loop: without it, health would freeze silently for the gateway's lifetime.
                log.exception("health check round failed")
            await asyncio.sleep(self._health.interval)

    async def _scrape_loop(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:
                log.exception("metrics scrape round failed")  # NOTE: as in _health_loop
            await asyncio.sleep(self._scrape_interval)
