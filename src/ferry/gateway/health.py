"""The background loops that check backends' health and scrape their load signals.

Each result goes to the backend's circuit breaker (``circuit.py``, where the state diagram is); a
backend coming back wakes requests queued in the router (``on_change``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ferry.gateway.backends import Backend, UpstreamError
from ferry.gateway.config import HealthConfig

log = logging.getLogger("ferry.gateway")


class HealthMonitor:
    """Background tasks: health checks every ``interval``, /metrics scrapes every ``scrape_interval``."""

    def __init__(self, backends: Sequence[Backend], health: HealthConfig, scrape_interval: float,
                 on_change: Callable[[], None]) -> None:
        self._backends = backends
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
            if backend.breaker.health_failed():
                log.warning("backend %s is out: %s", backend.name, e)
            return
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
