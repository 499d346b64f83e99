"""Each deployment with room in turn."""

from __future__ import annotations

import itertools

from ferry.gateway.routing.base import Candidate, RoutingPolicy


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        room, saturated = self.split(candidates)
        room.sort(key=lambda c: c.index)
        if room:
            k = next(self._counter) % len(room)
            room = room[k:] + room[:k]
        return room + sorted(saturated, key=lambda c: c.index)
