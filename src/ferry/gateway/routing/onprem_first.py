"""On-prem while any on-prem deployment has room; overflow to the cloud at once when all are saturated."""

from __future__ import annotations

from ferry.gateway.routing.base import Candidate, RoutingPolicy


class OnPremFirst(RoutingPolicy):
    name = "onprem-first"

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        room, saturated = self.split(candidates)

        def key(c: Candidate) -> tuple[float, int]:
            return (c.load, c.index)

        # NOTE: saturated on-prem still beats saturated cloud: "saturated" is a soft signal (queue,
        # KV usage), and a class that may not leave the building must be served somewhere.
        return [*sorted((c for c in room if c.location == "onprem"), key=key),
                *sorted((c for c in room if c.location != "onprem"), key=key),
                *sorted((c for c in saturated if c.location == "onprem"), key=key),
                *sorted((c for c in saturated if c.location != "onprem"), key=key)]
