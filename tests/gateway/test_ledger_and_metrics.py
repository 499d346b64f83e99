"""The ledger: exact tokens and cost per request (on-prem priced too), usage reports, /metrics, /health."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from gateway.conftest import ENV, backend, config_dict

MSG = [{"role": "user", "content": "count the tokens please"}]


def test_ledger_totals_equal_the_backends_own_usage(upstreams, gateway) -> None:
    onprem, srv_on = upstreams("rack", token_delay=0.05)
    cloud, srv_cloud = upstreams("cloud", token_delay=0.05)
    gw = gateway([backend("rack", srv_on, "onprem", max_concurrency=2),
                  backend("cloud", srv_cloud, "cloud", kind="openai")])
    alice = gw.openai(gw.create_key(name="alice", team="a"))
    bob = gw.openai(gw.create_key(name="bob", team="b"))

    def job(i: int) -> None:
        client = alice if i % 2 else bob
        if i % 3:
            list(client.chat.completions.create(model="chat", messages=MSG, max_tokens=3 + i, stream=True))
        else:
            client.completions.create(model="chat", prompt="a b c", max_tokens=2 + i)

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(job, range(10)))
    rows = [r for r in gw.ledger() if r["status"] == 200]
    assert len(rows) == 10
    for up, name in ((onprem, "rack"), (cloud, "cloud")):
        mine = [r for r in rows if r["backend"] == name]
        assert sum(r["prompt_tokens"] for r in mine) == up.prompt_tokens_total
        assert sum(r["completion_tokens"] for r in mine) == up.completion_tokens_total
    assert sum(r["completion_tokens"] for r in rows) == sum(3 + i if i % 3 else 2 + i for i in range(10))
    # on-prem is priced with its amortized cost, never $0
    for r in rows:
        price_in, price_out = (0.05, 0.10) if r["location"] == "onprem" else (0.15, 0.60)
        assert r["cost_usd"] == pytest.approx((r["prompt_tokens"] * price_in + r["completion_tokens"] * price_out) / 1e6)
        assert r["cost_usd"] > 0 and r["latency_s"] > 0 and r["model"] == "chat" and r["data_class"] == "public"
    # aggregation by every dimension adds up to the same totals
    for group_by in ("key", "team", "backend", "location"):
        data = gw.admin.get("/admin/usage", params={"group_by": group_by}).json()["data"]
        assert sum(d["completion_tokens"] for d in data) == sum(r["completion_tokens"] for r in rows)
        assert sum(d["cost_usd"] for d in data) == pytest.approx(sum(r["cost_usd"] for r in rows))
    by_team = {d["group"]: d["requests"] for d in gw.admin.get("/admin/usage?group_by=team").json()["data"]}
    assert by_team == {"a": 5, "b": 5}
    later = gw.admin.get("/admin/usage", params={"since": str(time.time() + 60)}).json()
    assert later["data"] == []
    iso = gw.admin.get("/admin/usage", params={"since": "2000-01-01T00:00:00Z", "group_by": "location"}).json()
    assert sum(d["requests"] for d in iso["data"]) == 10
    assert gw.admin.get("/admin/usage", params={"group_by": "colour"}).status_code == 400
    assert gw.admin.get("/admin/usage", params={"since": "yesterday"}).status_code == 400
    # /metrics agrees with the ledger
    text = httpx.get(gw.url + "/metrics").text
    ok = sum(1 for r in rows if r["backend"] == "rack")
    assert f'ferry_gateway:requests_total{{backend="rack",data_class="public",location="onprem",status="200"}} ' \
           f'{float(ok)}' in text
    cost = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ferry_gateway:cost_usd_total"))
    assert cost == pytest.approx(sum(r["cost_usd"] for r in rows))
    for name in ("ferry_gateway:backend_inflight", "ferry_gateway:request_latency_seconds_bucket",
                 "ferry_gateway:time_to_first_token_seconds_bucket", "ferry_gateway:overflow_total"):
        assert name in text


def test_health_endpoint(upstreams, gateway) -> None:
    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    gw.wait_for(lambda: httpx.get(gw.url + "/health").json()["backends"]["rack"]["state"] == "up", what="rack up")
    body = httpx.get(gw.url + "/health").json()
    assert body["status"] == "ok" and body["backends"]["rack"] == {
        "location": "onprem", "state": "up", "up": True, "inflight": 0, "saturated": False}


def test_usage_command_reads_the_ledger(upstreams, gateway, tmp_path) -> None:
    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = gw.openai(gw.create_key(name="carol", team="ops"))
    for _ in range(3):
        client.chat.completions.create(model="chat", messages=MSG, max_tokens=4)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config_dict([backend("rack", srv, "onprem")], gw.config.database)))
    r = subprocess.run([sys.executable, "-m", "ferry.cli", "gateway", "usage", "--config", str(path),
                        "--group-by", "team"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", **ENV})
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ops")][0].split()
    assert line[1:5] == ["3", "3", str(3 * len(MSG[0]["content"].split())), "12"]
