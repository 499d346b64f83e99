"""Picks and reserves a deployment for a request: allowed location, up, room; the policy orders the rest.

Reservation is synchronous (no ``await`` between the room check and the in-flight increment), so
concurrent requests on one event loop never overfill a backend past ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from ferry.gateway.backends.base import Backend
from ferry.gateway.config import GatewayConfig, ModelRoute, OverflowConfig
from ferry.gateway.routing.base import Candidate, RoutingPolicy


class NoRoute(Exception):
    """No allowed deployment can take the request; ``reason`` is meant for the client."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code  # no_allowed_deployment | unavailable | exhausted


@dataclass(frozen=True)
class Reservation:
    candidate: Candidate
    overflow: bool  # sent to the cloud although the model has an on-prem deployment the class allows


class Router:
    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend], policy: RoutingPolicy) -> None:
        self._backends = backends
        self._policy = policy
        self._overflow: OverflowConfig = config.routing.overflow
        self._changed = asyncio.Event()

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    def saturated(self, backend: Backend) -> bool:
        o = self._overflow
        if backend.inflight >= math.ceil(o.inflight_fraction * backend.config.max_concurrency):
            return True
        s = backend.signals
        if o.max_waiting is not None and s.waiting is not None and s.waiting >= o.max_waiting:
            return True
        return o.max_kv_cache_usage is not None and s.kv_cache_usage is not None \
            and s.kv_cache_usage >= o.max_kv_cache_usage

    def _state(self, backend: Backend) -> str:
        if not backend.up:
            return "down (circuit open)"
        if backend.inflight >= backend.config.max_concurrency:
            return f"full ({backend.inflight}/{backend.config.max_concurrency} in flight)"
        return "saturated" if self.saturated(backend) else "available"

    def try_reserve(self, model: ModelRoute, locations: tuple[str, ...], exclude: frozenset[int] = frozenset()
                    ) -> Reservation | NoRoute:
        allowed = [(i, d) for i, d in enumerate(model.deployments)
                   if self._backends[d.backend].location in locations]
        if not allowed:
            where = " or ".join(locations)
            return NoRoute(f"model {model.name!r} has no deployment in {where}, the only location(s) this "
                           f"request's data class allows; it is not sent elsewhere", "no_allowed_deployment")
        remaining = [(i, d) for i, d in allowed if i not in exclude]
        if not remaining:
            return NoRoute(f"every allowed deployment of {model.name!r} failed for this request", "exhausted")
        candidates = []
        for i, d in remaining:
            b = self._backends[d.backend]
            if b.up and b.inflight < b.config.max_concurrency:
                candidates.append(Candidate(i, d, b, self.saturated(b)))
        if not candidates:
            states = "; ".join(f"{d.backend}: {self._state(self._backends[d.backend])}" for _, d in remaining)
            return NoRoute(f"no allowed deployment of {model.name!r} is available ({states}); allowed "
                           f"location(s): {', '.join(locations)}", "unavailable")
        best = self._policy.order(candidates)[0]
        best.backend.inflight += 1
        overflow = best.location != "onprem" and any(self._backends[d.backend].location == "onprem"
                                                     for _, d in allowed)
        return Reservation(best, overflow)

    async def reserve(self, model: ModelRoute, locations: tuple[str, ...], deadline: float,
                      exclude: frozenset[int] = frozenset()) -> Reservation:
        """Reserve a deployment, waiting for one to free up or come back until ``deadline`` (monotonic)."""
        while True:
            got = self.try_reserve(model, locations, exclude)
            if isinstance(got, Reservation):
                return got
            remaining = deadline - time.monotonic()
            if got.code != "unavailable" or remaining <= 0:
                raise got
            self._changed.clear()
            # NOTE: the event covers releases and health changes; the short poll covers load
            # signals that drop without an event of ours (a scrape lands between two waits).
            # anyio's scope, not asyncio.wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that lands as the event fires, and a request whose client left while
            # queued would then wait on and reach upstream.
            with anyio.move_on_after(min(remaining, 0.25)):
                await self._changed.wait()

    def release(self, backend: Backend) -> None:
        backend.inflight -= 1
        self.notify()

    def notify(self) -> None:
        self._changed.set()
