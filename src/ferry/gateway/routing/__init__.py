"""Routing: one file per policy, imported lazily by name; ``Router`` applies one to live backends."""

from __future__ import annotations

import importlib

from ferry.gateway.routing.base import Candidate, RoutingPolicy
from ferry.gateway.routing.router import NoRoute, Router

_POLICIES = {"onprem-first": ("ferry.gateway.routing.onprem_first", "OnPremFirst"),
             "least-load": ("ferry.gateway.routing.least_load", "LeastLoad"),
             "lowest-cost": ("ferry.gateway.routing.lowest_cost", "LowestCost"),
             "round-robin": ("ferry.gateway.routing.round_robin", "RoundRobin")}


def make_policy(name: str) -> RoutingPolicy:
    if name not in _POLICIES:
        raise ValueError(f"routing.policy: unknown policy {name!r}, expected one of {sorted(_POLICIES)}")
    module, cls = _POLICIES[name]
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Candidate", "NoRoute", "Router", "RoutingPolicy", "make_policy"]
