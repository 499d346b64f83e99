"""`ferry gateway` with a Ray Serve ferry application as a `ferry` backend: requests route through
it, and the gateway reads its load from the ingress's /metrics as from one `ferry serve` (the
engine series are the replicas' sums, KV usage their pool-weighted mean; the per-replica series
are not counted twice)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from cluster.ray_cluster import API_KEY, Deployed
from gateway.conftest import GatewayHarness, config_dict

from ferry.gateway.config import parse_config
from ferry.server.metrics import sample

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def test_gateway_routes_to_the_ray_app_and_scrapes_its_load(shared_app: Deployed,
                                                            tmp_path: Path) -> None:
    backend = {"name": "ray", "url": shared_app.base_url + "/v1", "location": "onprem",
               "kind": "ferry", "api_key_env": "RAY_APP_KEY", "max_concurrency": 4,
               "timeout": 60, "connect_timeout": 2, "input_per_mtok": 0.05,
               "output_per_mtok": 0.10}
    config = config_dict([backend], f"sqlite:///{tmp_path}/gateway.db",
                         models=[{"name": "chat", "deployments": [{"backend": "ray",
                                                                    "model": MODEL}]}])
    gw = GatewayHarness(parse_config(config), env={"RAY_APP_KEY": API_KEY})
    try:
        client = gw.openai(gw.create_key())
        resp = client.chat.completions.create(model="chat", temperature=0, max_tokens=6,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert resp.choices[0].message.content and resp.usage.completion_tokens == 6
        assert gw.ledger()[-1]["backend"] == "ray"

        # one long stream running on one replica: the gateway sees exactly one running request
        done = threading.Event()

        def long_stream() -> None:
            stream = client.chat.completions.create(
                model="chat", temperature=0, max_tokens=96, stream=True,
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": "Count to a hundred."}])
            for _ in stream:
                pass
            done.set()

        t = threading.Thread(target=long_stream)
        t.start()
        gw.wait_for(lambda: (gw.gw.backends["ray"].signals.running or 0) >= 1, timeout=30,
                    what="the gateway's scrape of the running request")
        signals = gw.gw.backends["ray"].signals
        m = shared_app.metrics()
        assert signals.running == 1.0  # not 2: ferry:replica_* series are not summed in
        assert sample(m, "ferry:num_requests_running") == 1.0
        assert sum(r["num_running"] for r in shared_app.healthy()) == 1
        per_replica = [r["kv_cache_usage"] for r in shared_app.healthy()]
        assert signals.kv_cache_usage is not None
        # the pool-weighted mean over the replicas (one holds blocks, the other next to none)
        assert 0 < signals.kv_cache_usage <= max(per_replica) + 0.05
        t.join(90)
        assert done.is_set(), "the stream through the gateway did not finish"
        gw.wait_for(lambda: gw.gw.backends["ray"].signals.running == 0, timeout=30,
                    what="the gateway's scrape of an idle app")
        assert httpx.get(gw.url + "/health", timeout=10).status_code == 200
    finally:
        gw.close()
