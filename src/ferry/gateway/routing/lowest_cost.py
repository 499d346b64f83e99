"""The cheapest deployment with room (input + output price per Mtok), then by load."""

from __future__ import annotations

from ferry.gateway.routing.base import Candidate, RoutingPolicy


class LowestCost(RoutingPolicy):
    name = "lowest-cost"

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        room, saturated = self.split(candidates)

        def key(c: Candidate) -> tuple[float, float, int]:
            return (c.input_per_mtok + c.output_per_mtok, c.load, c.index)

        return sorted(room, key=key) + sorted(saturated, key=key)
