"""Conversations sharing system prompts: the prefix-cache hit rate over both replicas is higher
with ferry's prefix-aware router than with Ray's default router."""

from __future__ import annotations

import time

import httpx
import pytest
from cluster.ray_cluster import Deployed, deploy, undeploy

from ferry.cluster.spec import ModelSpec
from ferry.server.metrics import parse_prometheus, sample

pytestmark = pytest.mark.slow

SYSTEMS = [f"You are assistant number {i}. " + "Answer briefly and politely. " * 12
           for i in range(4)]


def _workload(app: Deployed) -> float:
    """Two-turn conversations, two per system prompt; the replicas' hit rate (hits / queries)."""
    with httpx.Client(base_url=app.base_url, timeout=120) as client:
        for turn in range(2):
            for conv in range(8):
                messages = [{"role": "system", "content": SYSTEMS[conv % 4]},
                            {"role": "user", "content": f"Question {conv}: what is {conv} + 1?"}]
                if turn:
                    messages += [{"role": "assistant", "content": f"It is {conv + 1}."},
                                 {"role": "user", "content": "And times two?"}]
                r = client.post("/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200, r.text
        m = parse_prometheus(client.get("/metrics").text)
    return (sample(m, "ferry:replica_prefix_cache_hits_total")
            / sample(m, "ferry:replica_prefix_cache_queries_total"))


@pytest.mark.parametrize("routed", [True, False])
def test_hit_rate(http_port: int, routed: bool, record: dict[bool, float]) -> None:
    name = "ferry-routed" if routed else "ferry-default"
    app = deploy(http_port, ModelSpec(name=name, serve_args=("--max-num-seqs", "4"),
                                      num_replicas=2, prefix_routing=routed))
    try:
        time.sleep(1.5)  # NOTE: the replicas' first stats reach the hub
        record[routed] = _workload(app)
    finally:
        undeploy(app)
    print(f"prefix hit rate, {'prefix-aware' if routed else 'Ray default'} router: "
          f"{record[routed]:.3f}")
    if len(record) == 2:
        assert record[True] > record[False]


@pytest.fixture(scope="module")
def record() -> dict[bool, float]:
    return {}
