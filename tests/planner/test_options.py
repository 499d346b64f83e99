"""Hybrid splits, restricted share, and break-even volumes over a grid of traffic profiles."""

from __future__ import annotations

import math
import random

import pytest

from ferry.planner.catalog import ApiPrice, get_gpu
from ferry.planner.options import (API, _pure_costs, CLOUD, HYBRID_API, HYBRID_CLOUD, ONPREM, RESERVED, Fleet, best_hybrid,
                                   break_even, hybrid_curve, hybrid_point, min_onprem_replicas, price_options)
from ferry.planner.pricing import CostAssumptions, api_monthly, cloud_on_demand_monthly, onprem_monthly
from ferry.planner.traffic import Traffic

COSTS = CostAssumptions(api_price=ApiPrice(0.5, 1.5))
FLEET = Fleet(capacity_rps=2.0, gpus_per_replica=2, gpu=get_gpu("h100-sxm"), costs=COSTS)
HALF_DAY = Traffic(tuple([1.0] * 12 + [5.0] * 12), 1000, 500)


def test_hybrid_point_by_hand() -> None:
    # 1 replica (2 req/s): 12 h at 1 req/s on-prem; 12 h at 5 req/s: 2 on-prem, 3 overflow -> 2 rented replicas
    p = hybrid_point(1, CLOUD, HALF_DAY, FLEET, COSTS.api_price)
    assert p.onprem_share == pytest.approx((12 * 1 + 12 * 2) / (12 * 1 + 12 * 5))
    assert p.onprem_utilization == pytest.approx((12 * 1 + 12 * 2) / 24 / 2)
    assert p.onprem_usd == pytest.approx(onprem_monthly(2, FLEET.gpu, COSTS, p.onprem_utilization).total)
    assert p.overflow_usd == pytest.approx(cloud_on_demand_monthly([0] * 12 + [4] * 12, FLEET.gpu, COSTS))
    a = hybrid_point(1, API, HALF_DAY, FLEET, COSTS.api_price)
    requests = 3 * 3600 * 730 / 2  # 3 req/s for half of every day
    assert a.overflow_usd == pytest.approx(api_monthly(requests * 1000, requests * 500, COSTS.api_price))
    assert p.covers_percentile == 50.0


def _random_traffic(rng: random.Random) -> Traffic:
    base = rng.uniform(0.05, 20)
    return Traffic(tuple(base * rng.uniform(0.1, 3) for _ in range(24)), rng.randint(50, 4000), rng.randint(20, 1000),
                   restricted_share=rng.choice([0.0, 0.0, 0.2, 0.7]))


@pytest.mark.parametrize("seed", range(12))
def test_best_hybrid_is_the_grid_minimum_and_never_beats_by_costing_more(seed: int) -> None:
    rng = random.Random(seed)
    t = _random_traffic(rng)
    fleet = Fleet(capacity_rps=rng.uniform(0.2, 10), gpus_per_replica=rng.choice([1, 2, 8]),
                  gpu=get_gpu(rng.choice(["h100-sxm", "l4", "a100-80g"])), costs=COSTS)
    api = ApiPrice(rng.uniform(0.05, 3), rng.uniform(0.05, 10))
    curve = hybrid_curve(t, fleet, api)
    opts = {o.name: o for o in price_options(t, fleet, api, curve)}
    k_min = min_onprem_replicas(t, fleet)
    for name, target, pure in ((HYBRID_CLOUD, CLOUD, CLOUD), (HYBRID_API, API, API)):
        grid = [p.monthly_usd for p in curve if p.target == target and p.onprem_replicas >= k_min]
        assert opts[name].monthly_usd == pytest.approx(min(grid))
        assert opts[name].monthly_usd <= opts[ONPREM].monthly_usd * (1 + 1e-9)
        if t.restricted_share == 0:
            assert opts[name].monthly_usd <= min(opts[ONPREM].monthly_usd, opts[pure].monthly_usd) * (1 + 1e-9)
        # a restricted share forces at least that much on-prem capacity
        assert opts[name].onprem_replicas * fleet.capacity_rps >= t.restricted_share * t.peak_rps - 1e-9
        assert opts[name].onprem_share >= t.restricted_share - 1e-9


def test_restricted_share_rules_out_off_prem_options() -> None:
    t = Traffic(HALF_DAY.hourly_rps, 1000, 500, restricted_share=0.5)
    curve = hybrid_curve(t, FLEET, COSTS.api_price)
    opts = {o.name: o for o in price_options(t, FLEET, COSTS.api_price, curve)}
    assert min_onprem_replicas(t, FLEET) == 2  # 0.5 x 5 req/s peak = 2.5 req/s -> 2 replicas of 2 req/s
    assert not opts[CLOUD].allowed and not opts[API].allowed and not opts[RESERVED].allowed
    assert opts[ONPREM].allowed and opts[HYBRID_API].allowed and opts[HYBRID_CLOUD].allowed
    assert opts[HYBRID_API].onprem_replicas >= 2
    assert best_hybrid(curve, 2).onprem_replicas >= 2


def test_more_traffic_never_needs_fewer_replicas() -> None:
    peaks = [FLEET.replicas_for(HALF_DAY.scaled(s).peak_rps) for s in (0.1, 0.5, 1, 2, 4, 8)]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]


def test_break_even_separates_the_two_sides() -> None:
    t = HALF_DAY
    api = COSTS.api_price
    be = break_even(t, FLEET, api, ONPREM, API)
    assert be.monthly_mtok is not None
    base = (t.monthly_requests(COSTS.hours_per_month) * t.tokens_per_request) / 1e6
    s = be.monthly_mtok / base

    def costs(scale: float) -> tuple[float, float]:
        ts = t.scaled(scale)
        k = FLEET.replicas_for(ts.peak_rps)
        return (hybrid_point(k, CLOUD, ts, FLEET, api).monthly_usd, hybrid_point(0, API, ts, FLEET, api).monthly_usd)

    onprem_hi, api_hi = costs(s * 1.001)
    onprem_lo, api_lo = costs(s * 0.999)
    assert onprem_hi <= api_hi and onprem_lo > api_lo
    # free API tokens: self-hosting never wins
    never = break_even(t, FLEET, ApiPrice(0.0, 0.0), ONPREM, API)
    assert never.monthly_mtok is None and "not cheaper" in never.note
    assert math.isfinite(be.mean_rps)


def test_break_even_when_the_cheaper_side_wins_only_at_low_volume() -> None:
    # One owned replica beats renting at today's volume, but at many replicas renting follows the
    # daily curve while owned hardware is sized for the peak: on-prem wins only below a volume.
    t = Traffic(tuple([0.2] * 18 + [1.9] * 6), 1000, 500)
    api = COSTS.api_price

    def costs(scale: float) -> tuple[float, float]:
        c = _pure_costs(t.scaled(scale), FLEET, api)
        return c[ONPREM], c[CLOUD]

    assert costs(1.0)[0] <= costs(1.0)[1] and costs(1000.0)[0] > costs(1000.0)[1]
    be = break_even(t, FLEET, api, ONPREM, CLOUD)
    assert be.cheaper_below and be.monthly_mtok is not None and "only below" in be.note
    base = (t.monthly_requests(COSTS.hours_per_month) * t.tokens_per_request) / 1e6
    s = be.monthly_mtok / base
    assert s >= 1.0
    lo, hi = costs(s * 0.999), costs(s * 1.001)
    assert lo[0] <= lo[1] and hi[0] > hi[1]
