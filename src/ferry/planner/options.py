"""The serving options priced against one traffic profile: all on-prem, cloud GPUs (on-demand or reserved),
an API, and hybrids (``k`` on-prem replicas, the overflow to cloud GPUs or to the API); the hybrid split
that costs least, and the break-even volumes between options.

Hybrid with ``k`` on-prem replicas of capacity ``C`` requests/s, each hour ``h``::

    on-prem serves   min(rps_h, k C)         (restricted requests first: k C >= share x peak)
    overflow         rps_h - min(rps_h, k C)  -> ceil(overflow / C) rented replicas, or API tokens
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ferry.planner.catalog import ApiPrice, GpuSpec
from ferry.planner.pricing import (CostAssumptions, api_monthly, cloud_on_demand_monthly, cloud_reserved_monthly,
                                   onprem_monthly, per_mtok)
from ferry.planner.traffic import HOURS, Traffic

ONPREM, CLOUD, RESERVED, API = "on-prem", "cloud on-demand", "cloud reserved", "API"
HYBRID_CLOUD, HYBRID_API = "hybrid on-prem + cloud", "hybrid on-prem + API"
OVERFLOW_TARGETS = (CLOUD, API)


@dataclass(frozen=True)
class Fleet:
    """What one replica is and carries: everything the cost options need besides prices and traffic."""

    capacity_rps: float  # requests/s one replica carries within the SLOs
    gpus_per_replica: int
    gpu: GpuSpec  # prices already overridden by the costs file
    costs: CostAssumptions

    def replicas_for(self, rps: float) -> int:
        return math.ceil(rps / self.capacity_rps - 1e-9) if rps > 0 else 0


@dataclass(frozen=True)
class OptionCost:
    name: str
    monthly_usd: float
    usd_per_mtok: float
    fixed_share: float  # share of spend that does not move with traffic (owned or reserved)
    onprem_share: float  # share of requests served on-prem
    onprem_replicas: int
    peak_rented_replicas: int
    allowed: bool = True
    why_not: str = ""
    breakdown: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HybridPoint:
    """Monthly cost with ``onprem_replicas`` on-prem and the overflow sent to ``target``."""

    onprem_replicas: int
    target: str
    onprem_usd: float
    overflow_usd: float
    onprem_share: float  # share of requests served on-prem
    onprem_utilization: float  # mean load of the on-prem fleet over its capacity
    covers_percentile: float  # share of hours (x100) the on-prem capacity covers entirely

    @property
    def monthly_usd(self) -> float:
        return self.onprem_usd + self.overflow_usd

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "monthly_usd": self.monthly_usd}


def monthly_tokens(traffic: Traffic, costs: CostAssumptions) -> tuple[float, float]:
    """(input, output) tokens per month."""
    requests = traffic.monthly_requests(costs.hours_per_month)
    return requests * traffic.prompt_tokens, requests * traffic.output_tokens


def hybrid_point(k: int, target: str, traffic: Traffic, fleet: Fleet, api: ApiPrice) -> HybridPoint:
    """Cost of ``k`` on-prem replicas with every request above their capacity overflowing to ``target``."""
    if target not in OVERFLOW_TARGETS:
        raise ValueError(f"overflow target must be one of {OVERFLOW_TARGETS}, got {target!r}")
    cap = k * fleet.capacity_rps
    served = [min(r, cap) for r in traffic.hourly_rps]
    over = [r - s for r, s in zip(traffic.hourly_rps, served)]
    util = sum(served) / HOURS / cap if cap > 0 else 0.0
    onprem = onprem_monthly(k * fleet.gpus_per_replica, fleet.gpu, fleet.costs, util).total
    if target == CLOUD:
        rented = [fleet.replicas_for(o) * fleet.gpus_per_replica for o in over]
        overflow = cloud_on_demand_monthly(rented, fleet.gpu, fleet.costs)
    else:
        requests = sum(over) / HOURS * 3600 * fleet.costs.hours_per_month
        overflow = api_monthly(requests * traffic.prompt_tokens, requests * traffic.output_tokens, api)
    return HybridPoint(onprem_replicas=k, target=target, onprem_usd=onprem, overflow_usd=overflow,
                       onprem_share=sum(served) / sum(traffic.hourly_rps), onprem_utilization=util,
                       covers_percentile=100 * traffic.share_at_or_below(cap))


def min_onprem_replicas(traffic: Traffic, fleet: Fleet) -> int:
    """On-prem replicas the restricted share needs at the peak hour."""
    return fleet.replicas_for(traffic.restricted_share * traffic.peak_rps)


def hybrid_curve(traffic: Traffic, fleet: Fleet, api: ApiPrice) -> list[HybridPoint]:
    """Every split from zero on-prem replicas to enough for the peak, for both overflow targets."""
    k_peak = fleet.replicas_for(traffic.peak_rps)
    return [hybrid_point(k, t, traffic, fleet, api) for t in OVERFLOW_TARGETS for k in range(k_peak + 1)]


def best_hybrid(curve: list[HybridPoint], k_min: int, target: str | None = None) -> HybridPoint:
    """The cheapest allowed split (ties: more on-prem, the more predictable spend)."""
    allowed = [p for p in curve if p.onprem_replicas >= k_min and (target is None or p.target == target)]
    return min(allowed, key=lambda p: (round(p.monthly_usd, 6), -p.onprem_replicas))


def price_options(traffic: Traffic, fleet: Fleet, api: ApiPrice, curve: list[HybridPoint]) -> list[OptionCost]:
    """All-on-prem, cloud on-demand, cloud reserved, API, and the best hybrid for each overflow target."""
    tokens = sum(monthly_tokens(traffic, fleet.costs))
    k_peak = fleet.replicas_for(traffic.peak_rps)
    k_min = min_onprem_replicas(traffic, fleet)
    restricted = traffic.restricted_share > 0
    why = (f"{traffic.restricted_share:.0%} of requests are restricted and must stay on-prem" if restricted else "")

    def point(k: int, target: str) -> HybridPoint:
        return next(p for p in curve if p.onprem_replicas == k and p.target == target)

    def option(name: str, p: HybridPoint, *, allowed: bool = True, why_not: str = "") -> OptionCost:
        cap = p.onprem_replicas * fleet.capacity_rps
        rented = max(fleet.replicas_for(max(r - cap, 0.0)) for r in traffic.hourly_rps) if p.target == CLOUD else 0
        return OptionCost(name=name, monthly_usd=p.monthly_usd, usd_per_mtok=per_mtok(p.monthly_usd, tokens),
                          fixed_share=p.onprem_usd / p.monthly_usd if p.monthly_usd > 0 else 1.0,
                          onprem_share=p.onprem_share, onprem_replicas=p.onprem_replicas, peak_rented_replicas=rented,
                          allowed=allowed, why_not=why_not,
                          breakdown={"onprem_usd": p.onprem_usd, "overflow_usd": p.overflow_usd})

    full = point(k_peak, CLOUD)
    onprem_detail = onprem_monthly(k_peak * fleet.gpus_per_replica, fleet.gpu, fleet.costs, full.onprem_utilization)
    onprem = option(ONPREM, full)
    onprem = OptionCost(**{**asdict(onprem), "breakdown": {"capex_usd": onprem_detail.capex,
                                                          "power_usd": onprem_detail.power,
                                                          "ops_usd": onprem_detail.ops}})
    reserved_usd = cloud_reserved_monthly(k_peak * fleet.gpus_per_replica, fleet.gpu, fleet.costs)
    reserved = OptionCost(name=RESERVED, monthly_usd=reserved_usd, usd_per_mtok=per_mtok(reserved_usd, tokens),
                          fixed_share=1.0, onprem_share=0.0, onprem_replicas=0, peak_rented_replicas=k_peak,
                          allowed=not restricted, why_not=why)
    return [
        onprem,
        option(CLOUD, point(0, CLOUD), allowed=not restricted, why_not=why),
        reserved,
        option(API, point(0, API), allowed=not restricted, why_not=why),
        option(HYBRID_CLOUD, best_hybrid(curve, k_min, CLOUD)),
        option(HYBRID_API, best_hybrid(curve, k_min, API)),
    ]


@dataclass(frozen=True)
class BreakEven:
    """The monthly volume where ``cheaper`` and ``other`` swap (within 1/1000x..1000x today's volume):
    ``cheaper`` wins above it, or only below it when ``cheaper_below`` (e.g. owned hardware sized for the
    peak against rented GPUs that follow the daily curve, once volume makes replicas fine-grained)."""

    cheaper: str
    other: str
    monthly_mtok: float | None  # None: never within the range scanned
    mean_rps: float | None
    note: str
    cheaper_below: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pure_costs(traffic: Traffic, fleet: Fleet, api: ApiPrice) -> dict[str, float]:
    k_peak = fleet.replicas_for(traffic.peak_rps)
    return {ONPREM: hybrid_point(k_peak, CLOUD, traffic, fleet, api).monthly_usd,
            CLOUD: hybrid_point(0, CLOUD, traffic, fleet, api).monthly_usd,
            API: hybrid_point(0, API, traffic, fleet, api).monthly_usd}


def break_even(traffic: Traffic, fleet: Fleet, api: ApiPrice, a: str, b: str, *, points: int = 121,
               span: float = 1000.0) -> BreakEven:
    """Scale the whole profile by s in [1/span, span]; find the smallest volume from which ``a`` stays cheaper.

    Costs are step functions of volume (whole replicas), so the scan finds the last grid point where ``a``
    loses and bisection narrows the switch between it and the next one.
    """
    base_mtok = sum(monthly_tokens(traffic, fleet.costs)) / 1e6
    scales = [span ** (2 * i / (points - 1) - 1) for i in range(points)]

    def a_wins(s: float) -> bool:
        c = _pure_costs(traffic.scaled(s), fleet, api)
        return c[a] <= c[b]

    wins = [a_wins(s) for s in scales]
    today = f"today {base_mtok:,.0f} Mtok/month"
    if not any(wins):
        return BreakEven(a, b, None, None,
                         f"{a} is not cheaper than {b} at any volume from 1/{span:g} to {span:g}x today's")
    if not wins[-1]:
        # a wins somewhere but loses at the top: find where it stops winning.
        last = max(i for i, w in enumerate(wins) if w)
        lo, hi = scales[last], scales[last + 1]
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if a_wins(mid) else (lo, mid)
        return BreakEven(a, b, base_mtok * lo, traffic.mean_rps * lo,
                         f"{a} is cheaper than {b} only below {base_mtok * lo:,.0f} Mtok/month "
                         f"({traffic.mean_rps * lo:.3g} req/s mean; {today})", cheaper_below=True)
    losing = [i for i, w in enumerate(wins) if not w]
    if not losing:
        s = scales[0]
        return BreakEven(a, b, base_mtok * s, traffic.mean_rps * s,
                         f"{a} is cheaper than {b} at every volume down to 1/{span:g} of today's")
    lo, hi = scales[losing[-1]], scales[losing[-1] + 1]
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if a_wins(mid) else (mid, hi)
    return BreakEven(a, b, base_mtok * hi, traffic.mean_rps * hi,
                     f"{a} is cheaper than {b} above {base_mtok * hi:,.0f} Mtok/month "
                     f"({traffic.mean_rps * hi:.3g} req/s mean; {today})")
