"""The deployment with the smallest in-flight fraction of its max_concurrency, wherever it is."""

from __future__ import annotations

from ferry.gateway.routing.base import Candidate, RoutingPolicy


class LeastLoad(RoutingPolicy):
    name = "least-load"

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        room, saturated = self.split(candidates)

        def key(c: Candidate) -> tuple[float, float, int]:
            waiting = c.backend.signals.waiting or 0.0
            return (c.load, waiting, c.index)

        return sorted(room, key=key) + sorted(saturated, key=key)
