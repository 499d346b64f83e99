"""Circuit breakers and the background loops that check health and scrape load signals.

    closed --N consecutive failures--> open --cooldown passed and a health check succeeds--> half-open
                                        ^  |                                                      |
                                        +--+ a failed health check re-arms the cooldown           |
                                        ^                                                         |
                                        +------------- one request failure -----------------------+
    half-open --a request succeeds--> closed

Health checks never reset a closed circuit's failure count: only a successful request does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ferry.gateway.config import HealthConfig

if TYPE_CHECKING:
    from ferry.gateway.backends.base import Backend

log = logging.getLogger("ferry.gateway")


class CircuitBreaker:
    """Request failures and health-check failures are counted apart: a backend whose ``/models``
    answers while its completions fail must still go out, and a flaky health check must not be
    forgiven by a successful request."""

    def __init__(self, failure_threshold: int, cooldown: float) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.failures = 0  # consecutive request failures
        self.health_failures = 0  # consecutive failed health checks
        self.opened_at: float | None = None
        self.half_open = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allows(self) -> bool:
        return self.opened_at is None

    def _open(self, now: float | None) -> bool:
        self.opened_at = time.monotonic() if now is None else now
        self.half_open = False
        return True

    def record_failure(self, now: float | None = None) -> bool:
        """A request failed; returns True when this opened (or re-armed) the circuit."""
        self.failures += 1
        if self.opened_at is not None or self.half_open or self.failures >= self.failure_threshold:
            return self._open(now)
        return False

    def record_success(self) -> None:
        """A request succeeded: the failure streak is over and a half-open circuit closes for good."""
        if self.opened_at is None:
            self.failures = 0
            self.half_open = False

    def health_failed(self, now: float | None = None) -> bool:
        """A health check failed; returns True when this opened (or re-armed) the circuit."""
        self.health_failures += 1
        if self.opened_at is not None or self.health_failures >= self.failure_threshold:
            return self._open(now)
        return False

    def health_ok(self, now: float | None = None) -> bool:
        """A health check passed; returns True when it moved an open circuit to half-open."""
        now = time.monotonic() if now is None else now
        self.health_failures = 0
        if self.opened_at is None or now - self.opened_at < self.cooldown:
            return False
        # NOTE: half-open: a health check cannot prove that inference works, so the first request
        # failure after coming back opens the circuit again at once.
        self.opened_at = None
        self.failures = 0
        self.half_open = True
        return True


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
        from ferry.gateway.backends.base import UpstreamError

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
        from ferry.gateway.backends.base import UpstreamError

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
