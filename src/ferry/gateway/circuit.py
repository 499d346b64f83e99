"""A backend's circuit breaker: request failures and health checks open it, a passing check lets it back.

    closed --N consecutive failures--> open --cooldown passed and a health check succeeds--> half-open
                                        ^  |                                                      |
                                        +--+ a failed health check re-arms the cooldown           |
                                        ^                                                         |
                                        +------------- one request failure -----------------------+
    half-open --a request succeeds--> closed

Health checks never reset a closed circuit's failure count: only a successful request does.
A leaf: backends own one each (``backends/base.py``), the health monitor and the proxy feed it.
"""

from __future__ import annotations

import time


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
