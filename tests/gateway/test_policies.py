"""Routing policies order candidates; the router filters by location, health and room, and reserves."""

from __future__ import annotations

import time

import pytest

from ferry.gateway.backends import make_backend
from ferry.gateway.backends.base import LoadSignals
from ferry.gateway.backends.ferry import parse_load
from ferry.gateway.circuit import CircuitBreaker
from ferry.gateway.config import parse_config
from ferry.gateway.routing import NoRoute, Router, make_policy


def _setup(policy: str, specs: list[tuple[str, str, int, float]]):
    cfg = parse_config({
        "backends": [{"name": n, "url": f"http://127.0.0.1:{9000 + i}/v1", "location": loc, "max_concurrency": mc,
                      "input_per_mtok": price, "output_per_mtok": price} for i, (n, loc, mc, price) in enumerate(specs)],
        "models": [{"name": "m", "deployments": [{"backend": n, "model": n} for n, *_ in specs]}],
        "routing": {"policy": policy, "overflow": {"max_waiting": 2, "max_kv_cache_usage": 0.9}}})
    backends = {b.name: make_backend(b, cfg.health, {}) for b in cfg.backends}
    return cfg, backends, Router(cfg, backends, make_policy(policy))


def _pick(router, cfg, locations=("onprem", "cloud")) -> str:
    res = router.try_reserve(cfg.model("m"), locations)
    assert not isinstance(res, NoRoute), res
    return res.candidate.backend.name


def test_onprem_first_fills_on_prem_then_overflows_then_drains_back() -> None:
    cfg, b, router = _setup("onprem-first", [("cloud", "cloud", 10, 0.1), ("r1", "onprem", 2, 1.0),
                                             ("r2", "onprem", 1, 1.0)])
    # least-loaded on-prem first, cloud only when every on-prem deployment is saturated
    assert [_pick(router, cfg) for _ in range(5)] == ["r1", "r2", "r1", "cloud", "cloud"]
    router.release(b["r2"])
    assert _pick(router, cfg) == "r2"
    res = router.try_reserve(cfg.model("m"), ("onprem", "cloud"))
    assert res.overflow and res.candidate.location == "cloud"
    # restricted: no room on-prem and the cloud not allowed -> nothing, and the reason names each
    no = router.try_reserve(cfg.model("m"), ("onprem",))
    assert isinstance(no, NoRoute) and no.code == "unavailable" and "r1: full (2/2 in flight)" in no.reason


def test_scraped_signals_saturate_but_restricted_still_uses_them() -> None:
    cfg, b, router = _setup("onprem-first", [("r1", "onprem", 8, 1.0), ("cloud", "cloud", 8, 0.1)])
    b["r1"].signals = LoadSignals(waiting=2)
    assert _pick(router, cfg) == "cloud"
    assert _pick(router, cfg, ("onprem",)) == "r1"  # soft saturation: on-prem still serves what must stay
    b["r1"].signals = LoadSignals(waiting=0, kv_cache_usage=0.95)
    assert _pick(router, cfg) == "cloud"
    b["r1"].signals = LoadSignals(waiting=0, kv_cache_usage=0.5)
    assert _pick(router, cfg) == "r1"


def test_least_load_lowest_cost_round_robin() -> None:
    cfg, b, router = _setup("least-load", [("a", "onprem", 4, 1.0), ("b", "cloud", 2, 0.5)])
    assert [_pick(router, cfg) for _ in range(4)] == ["a", "b", "a", "a"]  # tie -> config order; 0 < 1/4; 1/4 < 1/2; tie
    cfg, b, router = _setup("lowest-cost", [("a", "onprem", 4, 1.0), ("b", "cloud", 2, 0.5)])
    assert [_pick(router, cfg) for _ in range(4)] == ["b", "b", "a", "a"]  # cheapest until it is full
    cfg, b, router = _setup("round-robin", [("a", "onprem", 9, 1.0), ("b", "onprem", 9, 1.0), ("c", "cloud", 9, 1)])
    assert [_pick(router, cfg) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ValueError, match="routing.policy"):
        make_policy("fastest")


def test_down_backends_are_skipped_and_excluded_ones_exhaust() -> None:
    cfg, b, router = _setup("onprem-first", [("r1", "onprem", 4, 1.0), ("r2", "onprem", 4, 1.0)])
    for _ in range(3):
        b["r1"].breaker.record_failure()
    assert _pick(router, cfg) == "r2"
    no = router.try_reserve(cfg.model("m"), ("onprem",), frozenset({1}))
    assert isinstance(no, NoRoute) and "r1: down" in no.reason
    b["r1"].breaker.opened_at = None
    no = router.try_reserve(cfg.model("m"), ("onprem",), frozenset({0, 1}))
    assert isinstance(no, NoRoute) and no.code == "exhausted"
    no = router.try_reserve(cfg.model("m"), ("cloud",))
    assert isinstance(no, NoRoute) and no.code == "no_allowed_deployment"


def test_circuit_breaker_states() -> None:
    br = CircuitBreaker(failure_threshold=2, cooldown=10)
    assert not br.record_failure(now=0) and br.allows()
    br.record_success()
    assert not br.record_failure(now=1) and br.record_failure(now=2) and not br.allows()
    assert not br.health_ok(now=5) and not br.allows()  # still cooling down
    assert br.health_failed(now=6)  # a failed check re-arms the cooldown
    assert not br.health_ok(now=15) and br.health_ok(now=16) and br.allows() and br.half_open
    assert br.record_failure(now=17) and not br.allows()  # half-open: one failure is enough
    assert br.health_ok(now=27) and br.allows()
    br.record_success()
    assert not br.half_open and not br.record_failure(now=28) and br.allows()


def test_health_and_request_failures_count_apart() -> None:
    br = CircuitBreaker(failure_threshold=2, cooldown=10)
    br.record_failure(now=0)
    br.health_ok(now=1)  # /models answers, but completions fail: still counted
    assert br.record_failure(now=2) and not br.allows()
    br = CircuitBreaker(failure_threshold=2, cooldown=10)
    br.health_failed(now=0)
    br.record_success()  # a request got through, the health endpoint still fails twice in a row
    assert br.health_failed(now=1) and not br.allows()


async def test_reserve_waits_for_room_then_times_out() -> None:
    cfg, b, router = _setup("onprem-first", [("r1", "onprem", 1, 1.0)])
    first = router.try_reserve(cfg.model("m"), ("onprem",))
    import asyncio

    async def free_soon() -> None:
        await asyncio.sleep(0.05)
        router.release(first.candidate.backend)

    task = asyncio.create_task(free_soon())
    got = await router.reserve(cfg.model("m"), ("onprem",), time.monotonic() + 5)
    await task
    assert got.candidate.backend.name == "r1"
    with pytest.raises(NoRoute) as e:
        await router.reserve(cfg.model("m"), ("onprem",), time.monotonic() + 0.05)
    assert e.value.code == "unavailable"


def test_parse_ferry_metrics() -> None:
    text = ('# TYPE ferry:num_requests_waiting gauge\nferry:num_requests_waiting{model_name="a"} 2\n'
            'ferry:num_requests_waiting{model_name="b"} 1\n# TYPE ferry:kv_cache_usage_perc gauge\n'
            'ferry:kv_cache_usage_perc{model_name="a"} 0.5\n')
    assert parse_load(text) == LoadSignals(running=None, waiting=3.0, kv_cache_usage=0.5)
