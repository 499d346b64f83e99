"""Autoscaling on ferry's load signal: one replica whose small KV pool two requests fill grows to
two (Ray's ongoing-request count, 2 against a target of 2.5, would not), and shrinks back when idle."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from cluster.ray_cluster import Deployed, deploy, undeploy, wait_for

from ferry.cluster.spec import AutoscalingSpec, ModelSpec

serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning")]

NAME = "ferry-auto"
# 3 MB of KV cache: 4 blocks of 16 tokens (a 64-token context) for SmolLM2
ARGS = ("smollm2-135m-instruct", "--max-num-seqs", "4", "--kv-cache-memory", "3MB")
SCALING = AutoscalingSpec(min_replicas=1, max_replicas=2, target_load=2.5, upscale_delay_s=1.0,
                          downscale_delay_s=4.0, metrics_interval_s=0.5, look_back_period_s=2.0)
# 26 tokens: 2 blocks each, so two of them fill the pool from their start (26 + 36 <= 64)
PROMPT = ("Here is a long list of the numbers from one to fifty, one per line, with nothing else "
          "at all, starting now:")
MAX_REQUESTS = 60  # the burst's bound, all clients together


def running_replicas() -> int:
    dep = serve.status().applications[NAME].deployments["FerryReplica"]
    return sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))


@pytest.fixture(scope="module")
def app(http_port: int) -> Iterator[Deployed]:
    deployed = deploy(http_port, ModelSpec(name=NAME, serve_args=ARGS, autoscaling=SCALING,
                                           route_prefix="/auto"))
    try:
        yield deployed
    finally:
        undeploy(deployed)


def test_grows_on_a_full_kv_pool_and_shrinks_when_idle(app: Deployed) -> None:
    assert running_replicas() == 1
    stop = threading.Event()
    sent: list[int] = []
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=app.base_url, timeout=60) as c:
            while not stop.is_set() and len(sent) < MAX_REQUESTS:
                sent.append(1)
                r = c.post("/v1/completions", json={
                    "prompt": PROMPT, "max_tokens": 36, "temperature": 0, "ignore_eos": True})
                statuses.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(2)]  # 2 requests at a time
    for t in threads:
        t.start()
    try:
        peak = wait_for(lambda: running_replicas() == 2 and 2, 90, "a second replica",
                        every=0.25)
        # the new replica serves: both report to the ingress
        wait_for(lambda: len(app.healthy()) == 2, 60, "2 healthy replicas at the ingress")
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads), "a burst request hung"
    assert statuses and all(s == 200 for s in statuses), statuses
    print(f"\nscaled to {peak} replicas after {len(sent)} requests (2 at a time)")
    # idle: back to one replica, and the ingress reports one
    wait_for(lambda: running_replicas() == 1, 90, "the shrink back to 1 replica")
    wait_for(lambda: len(app.healthy()) == 1, 30, "1 healthy replica at the ingress")
    r = httpx.post(app.base_url + "/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
