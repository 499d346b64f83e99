"""A replica killed (SIGKILL) mid-load: no request hangs, each one gets its answer or a clear 503
(in-band once its stream started), Ray replaces the replica and the ingress reports its return."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import httpx
import openai
import pytest
from cluster.ray_cluster import API_KEY, Deployed, wait_for

from ferry.server.metrics import sample

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
REQUESTS = 12
CLIENT_TIMEOUT_S = 90.0


def _one(base_url: str, i: int) -> tuple[str, Any]:
    """("ok", text) | ("http", APIStatusError) | ("inband", APIError) for request ``i``."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=CLIENT_TIMEOUT_S)
    kw: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 40,
                          "extra_body": {"ignore_eos": True},
                          "messages": [{"role": "user", "content": f"Count slowly to {20 + i}."}]}
    try:
        if i % 2:
            stream = client.chat.completions.create(stream=True, **kw)
            parts, finish = [], None
            for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            assert finish == "length", f"stream {i} ended without a finish reason"
            return "ok", "".join(parts)
        resp = client.chat.completions.create(**kw)
        assert resp.usage is not None and resp.usage.completion_tokens == 40
        return "ok", resp.choices[0].message.content
    except openai.APIStatusError as exc:
        return "http", exc
    except openai.APIError as exc:  # an in-band error event: the status line was 200
        return "inband", exc


def test_killed_replica_is_survived_and_replaced(shared_app: Deployed) -> None:
    before = wait_for(lambda: len(shared_app.healthy()) == 2 and shared_app.healthy(), 60,
                      "2 healthy replicas")
    with ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(_one, shared_app.base_url, i) for i in range(REQUESTS)]
        # the victim: a replica with sequences running (stats are at most ~0.5 s old)
        victim = wait_for(lambda: next((r for r in shared_app.healthy()
                                        if r["num_running"] > 0), None), 60,
                          "a replica with running sequences", every=0.2)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        # a request sent right after the kill still gets its answer (the survivor serves it)
        after = pool.submit(_one, shared_app.base_url, 100)
        _, pending = wait(futures + [after], timeout=CLIENT_TIMEOUT_S + 30)
        assert not pending, f"{len(pending)} request(s) hung"
    outcomes = [f.result() for f in futures]
    assert after.result()[0] == "ok", after.result()
    ok = [o for o in outcomes if o[0] == "ok"]
    failed = [o[1] for o in outcomes if o[0] != "ok"]
    print(f"\n{len(ok)} answered, {len(failed)} failed with 503 of {REQUESTS}; "
          f"last request done {time.monotonic() - killed_at:.1f}s after the kill")
    # the victim held running sequences: those that had produced tokens cannot be retried
    assert failed, "no request noticed the killed replica"
    for kind, exc in ((o[0], o[1]) for o in outcomes if o[0] != "ok"):
        body = exc.body if isinstance(exc.body, dict) else {}
        if kind == "http":
            assert exc.status_code == 503, exc
            body = body.get("error", body)
        assert body.get("code") == "engine_dead", (kind, exc.body)
        assert "replica" in body.get("message", ""), body
        assert set(body) >= {"message", "type", "code"}, body

    # Ray replaces the replica; /health/replicas and ferry:replica_up report the new one
    def replaced() -> dict | None:
        healthy = shared_app.healthy()
        new = [r for r in healthy if r["pid"] not in {b["pid"] for b in before}]
        return new[0] if len(healthy) == 2 and new else None

    new = wait_for(replaced, 180, "the replacement replica")
    m = shared_app.metrics()
    assert sample(m, "ferry:replica_up", replica=new["replica"]) == 1.0
    dead = [r for r in shared_app.replicas() if r["pid"] == victim["pid"]]
    assert all(not r["healthy"] for r in dead)
    if dead:
        assert sample(m, "ferry:replica_up", replica=victim["replica"]) == 0.0
    assert httpx.get(shared_app.base_url + "/health", timeout=10).status_code == 200
    # and the replaced replica answers
    assert _one(shared_app.base_url, 200)[0] == "ok"
