"""Data classes an attacker cannot get around.

Every variant in ``attack_variants`` (personal data in every field a request carries, split across
messages and parts, obfuscated; bodies the scanner cannot classify) goes through a real gateway
whose on-prem upstream is (a) down, (b) saturated, or (c) full, with a cloud upstream that records
what it receives. What arrived is counted at the cloud itself: nothing with personal data and
nothing unclassifiable, while clean bodies in the same fields still overflow there, so a gateway
that refused everything could not pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from gateway.attack_variants import CLEAN, PII, UNSCANNABLE, Variant
from gateway.conftest import GatewayHarness, backend, config_dict
from gateway.upstream import ServerThread, UpstreamState, start_upstream

from ferry.gateway.config import parse_config

PATTERNS = {"employee_id": r"\bEMP-\d{6}\b"}
REFUSED = PII + UNSCANNABLE


@dataclass
class Scenario:
    harness: GatewayHarness
    onprem: UpstreamState
    cloud: UpstreamState
    client: Any


def send(client: Any, v: Variant) -> tuple[int, str | None]:
    """(status, x-ferry-backend) of ``v`` sent with the official client; the stream read to its end."""
    body = copy.deepcopy(v.body)
    stream = bool(body.pop("stream", False))
    try:
        if v.endpoint == "chat":
            raw = client.chat.completions.with_raw_response.create(
                model="chat", messages=body.pop("messages"), max_tokens=4, stream=stream, extra_body=body)
        else:
            raw = client.completions.with_raw_response.create(
                model="chat", prompt=body.pop("prompt"), max_tokens=4, stream=stream, extra_body=body)
    except openai.APIStatusError as e:
        return e.status_code, None
    result = raw.parse()
    if stream:
        assert sum(1 for _ in result) > 0
    return raw.status_code, raw.headers.get("x-ferry-backend")


def _scenario(tmp: Any, name: str, onprem_kw: dict[str, Any], **top: Any
              ) -> tuple[Scenario, list[ServerThread]]:
    onprem, srv_on = start_upstream("rack", **onprem_kw)
    cloud, srv_cloud = start_upstream("cloud")
    backends = [backend("rack", srv_on, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai",
                                                           max_concurrency=32)]
    config = parse_config(config_dict(backends, f"sqlite:///{tmp}/{name}.db", pii={"patterns": PATTERNS}, **top))
    harness = GatewayHarness(config)
    return Scenario(harness, onprem, cloud, harness.openai(harness.create_key())), [srv_on, srv_cloud]


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    s, servers = _scenario(tmp_path_factory.mktemp("down"), "down", {}, routing={"queue_timeout": 0.2})
    servers[0].stop()
    s.harness.wait_for(lambda: not s.harness.gw.backends["rack"].up, what="on-prem's circuit to open")
    yield s
    s.harness.close()
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    # the replica's own queue says it is saturated: cloud-eligible traffic overflows at once
    s, servers = _scenario(tmp_path_factory.mktemp("saturated"), "saturated", {"forced_waiting": 5},
                           routing={"overflow": {"max_waiting": 1}})
    rack = s.harness.gw.backends["rack"]
    s.harness.wait_for(lambda: s.harness.gw.router.saturated(rack), what="a scrape showing on-prem saturated")
    yield s
    s.harness.close()
    for srv in servers:
        srv.stop()


def _last_row(s: Scenario) -> dict[str, Any]:
    return s.harness.ledger()[-1]


def _ids(v: Variant) -> str:
    return v.id


@pytest.mark.parametrize("variant", REFUSED, ids=_ids)
def test_on_prem_down_personal_data_gets_503_and_never_reaches_the_cloud(down: Scenario, variant: Variant) -> None:
    before = down.cloud.requests
    assert send(down.client, variant) == (503, None)
    assert down.cloud.requests == before  # counted at the cloud backend itself
    row = _last_row(down)
    assert row["pii"] and variant.kind in row["pii_kinds"].split(","), row["pii_kinds"]
    assert (row["data_class"], row["status"], row["backend"]) == ("restricted", 503, None)


@pytest.mark.parametrize("variant", CLEAN, ids=_ids)
def test_on_prem_down_clean_requests_still_reach_the_cloud(down: Scenario, variant: Variant) -> None:
    before = down.cloud.requests
    assert send(down.client, variant) == (200, "cloud")
    assert down.cloud.requests == before + 1
    row = _last_row(down)
    assert (row["pii"], row["pii_kinds"], row["data_class"], row["location"]) == (False, None, "public", "cloud")
    # the cloud got every field the client sent: the test's bodies are not stripped on the way
    assert set(variant.body) - {"stream"} <= set(down.cloud.bodies[-1])


@pytest.mark.parametrize("variant", REFUSED, ids=_ids)
def test_on_prem_saturated_personal_data_stays_on_prem(saturated: Scenario, variant: Variant) -> None:
    before = saturated.cloud.requests
    assert send(saturated.client, variant) == (200, "rack")
    assert saturated.cloud.requests == before
    row = _last_row(saturated)
    assert row["pii"] and variant.kind in row["pii_kinds"].split(","), row["pii_kinds"]
    assert (row["data_class"], row["location"], row["overflow"]) == ("restricted", "onprem", False)


@pytest.mark.parametrize("variant", CLEAN, ids=_ids)
def test_on_prem_saturated_clean_requests_overflow_to_the_cloud(saturated: Scenario, variant: Variant) -> None:
    before = saturated.cloud.requests
    assert send(saturated.client, variant) == (200, "cloud")
    assert saturated.cloud.requests == before + 1
    row = _last_row(saturated)
    assert (row["pii"], row["data_class"], row["overflow"]) == (False, "public", True)


def test_on_prem_full_personal_data_waits_for_it_while_clean_requests_overflow(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack", delay=0.3)
    cloud, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem", max_concurrency=1),
                  backend("cloud", srv_cloud, "cloud", kind="openai", max_concurrency=32)],
                 routing={"queue_timeout": 30}, pii={"patterns": PATTERNS})
    client = gw.openai(gw.create_key())
    waiting = PII[::5] + UNSCANNABLE[2:3]  # a sample: each holds on-prem's one slot for 0.3 s
    sent = waiting + CLEAN
    with ThreadPoolExecutor(len(sent)) as pool:
        results = list(pool.map(lambda v: send(client, v), sent))
    assert results[:len(waiting)] == [(200, "rack")] * len(waiting)
    clean = results[len(waiting):]
    assert all(status == 200 for status, _ in clean) and ("cloud", 200) in {(b, s) for s, b in clean}
    # what the cloud received is exactly the clean requests that were answered from it
    assert cloud.requests == sum(1 for _, b in clean if b == "cloud")
    assert onprem.max_running == 1


def test_detections_are_counted_by_detector_in_metrics(upstreams, gateway) -> None:
    _, srv_on = upstreams("rack")
    _, srv_cloud = upstreams("cloud")
    gw = gateway([backend("rack", srv_on, "onprem"), backend("cloud", srv_cloud, "cloud", kind="openai")])
    client = gw.openai(gw.create_key())
    by_id = {v.id: v for v in REFUSED}
    for vid in ("card_dots", "card_zero_width", "email_split_messages", "too_deep"):
        assert send(client, by_id[vid]) == (200, "rack")
    text = httpx.get(gw.url + "/metrics").text
    assert 'ferry_gateway:pii_detections_total{detector="card"} 2.0' in text
    assert 'ferry_gateway:pii_detections_total{detector="email"} 1.0' in text
    assert 'ferry_gateway:pii_detections_total{detector="scan_failed:too_deep"} 1.0' in text
    assert [r["pii_kinds"] for r in gw.ledger()] == ["card", "card", "email", "scan_failed:too_deep"]
