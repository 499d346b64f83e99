"""A ledger that settles after a crash: streams' delivered tokens written while they run, rows of a dead
gateway settled on restart (or by a live peer), never a live peer's rows; cut streams billed for what
reached the client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway.conftest import ENV, MASTER, backend, config_dict
from gateway.databases import database, ledger_rows  # noqa: F401  (database: a fixture)
from gateway.gateway_process import GatewayProcess
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, inspect, select

from ferry.gateway.app import create_app
from ferry.gateway.config import parse_config
from ferry.gateway.db import instances_table, ledger_table, make_engine
from ferry.gateway.ledger import Ledger
from ferry.gateway.recovery import Instances, host_identity

PRICE = 1000.0  # USD per million tokens in and out: $0.001 a token
FAST_LEDGER = {"progress_interval": 0.2, "instance_lease": 600}  # NOTE: the lease never expires in these tests


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def _open_stream(stack: AsyncExitStack, http: httpx.AsyncClient, url: str, secret: str, i: int,
                       max_tokens: int, tokens: int) -> AsyncIterator[str]:
    """A stream left open after its first ``tokens`` content chunks were read; returns its line iterator."""
    r = await stack.enter_async_context(http.stream(
        "POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
        json={"model": "chat", "messages": [{"role": "user", "content": f"tell {i}"}], "max_tokens": max_tokens,
              "stream": True}))
    assert r.status_code == 200, await r.aread()
    lines = r.aiter_lines()
    seen = 0
    while seen < tokens:
        line = await anext(lines)
        seen += '"content": "' in line and '"content": ""' not in line
    return lines


async def test_sigkill_with_streams_in_flight_then_restart_settles_and_bills_delivered(
        upstreams, database, tmp_path: Path) -> None:  # noqa: F811
    _, srv = upstreams("rack", token_delay=0.2)
    config = config_dict([backend("rack", srv, "onprem", timeout=30, input_per_mtok=PRICE, output_per_mtok=PRICE)],
                         database, ledger=FAST_LEDGER)
    g = GatewayProcess(config, tmp_path, "a").start()
    try:
        secret = g.create_key(name="k", budget_usd=0.5)
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            # each stream reserves 2 prompt + 200 completion tokens = $0.202: three hold $0.606 of $0.50
            # NOTE: the line iterators are kept: a dropped one is closed by the garbage collector, and its stream with it
            held = await asyncio.gather(*(_open_stream(stack, http, g.url, secret, i, 200, 5) for i in range(3)))
            refused = await http.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                      json={"model": "chat", "messages": [{"role": "user", "content": "x"}],
                                            "max_tokens": 4})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
            # the keeper writes what each stream delivered while it runs
            await asyncio.to_thread(_wait, lambda: all(r["completion_tokens"] >= 5 for r in ledger_rows(database)
                                                       if r["status"] == 0), "progress on the rows")
            g.kill()
            assert len(held) == 3
        pending = [r for r in ledger_rows(database) if r["status"] == 0]
        assert len(pending) == 3 and all(r["reserved_cost_usd"] > 0 for r in pending)  # a crash left them held
        g.start()  # same instance name: its start-up settles what its last run left in flight
        settled = [r for r in ledger_rows(database) if r["id"] in {p["id"] for p in pending}]
        for r in settled:
            assert r["status"] == 500 and r["reason"].startswith("settled after gateway restart"), r
            assert r["reserved_tokens"] == 0 and r["reserved_cost_usd"] == 0
            assert r["backend"] == "rack" and r["prompt_tokens"] == 2 and 5 <= r["completion_tokens"] < 200
            assert r["cost_usd"] == pytest.approx((r["prompt_tokens"] + r["completion_tokens"]) * PRICE / 1e6)
        # no longer held against the budget: what was delivered (~$0.03) leaves room for another request
        async with httpx.AsyncClient(timeout=30) as http:
            ok = await http.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                 json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
        assert ok.status_code == 200, ok.text
    finally:
        g.stop()


async def test_a_restart_leaves_a_live_instances_rows_alone(upstreams, database, tmp_path: Path) -> None:  # noqa: F811
    _, srv = upstreams("rack", token_delay=0.1)
    config = config_dict([backend("rack", srv, "onprem", timeout=30, input_per_mtok=PRICE, output_per_mtok=PRICE)],
                         database, ledger=FAST_LEDGER)
    a, b = GatewayProcess(config, tmp_path, "a"), GatewayProcess(config, tmp_path, "b")
    try:
        a.start()
        b.start()
        secret = a.create_key(name="k")
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=60))
            on_b = await _open_stream(stack, http, b.url, secret, 0, 150, 3)
            async with AsyncExitStack() as on_a:
                held = await _open_stream(on_a, http, a.url, secret, 1, 150, 3)
                a.kill()
                assert held is not None
            await asyncio.to_thread(a.start)
            rows = {r["instance"]: r for r in ledger_rows(database)}
            assert rows["a"]["status"] == 500 and rows["a"]["reason"].startswith("settled after gateway")
            await asyncio.sleep(1.0)  # five keeper rounds on each instance
            rows = {r["instance"]: r for r in ledger_rows(database)}
            assert rows["b"]["status"] == 0 and rows["b"]["reserved_tokens"] > 0  # b is alive: left alone
            async for _ in on_b:  # b's stream runs to its end
                pass
        await asyncio.to_thread(_wait, lambda: {r["instance"]: r for r in ledger_rows(database)}["b"]["status"] != 0,
                                "b's row")
        row_b = {r["instance"]: r for r in ledger_rows(database)}["b"]
        assert (row_b["status"], row_b["completion_tokens"], row_b["reason"]) == (200, 150, None)
    finally:
        a.stop()
        b.stop()


def _pending(engine: Any, instance: str, ts: float) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ledger_table).values(
            ts=ts, instance=instance, status=0, admitted=True, key_id="k", reserved_tokens=100,
            reserved_cost_usd=0.1, prompt_tokens=3, completion_tokens=7, cost_usd=0.01))


def _instance(engine: Any, name: str, host: str, pid: int, heartbeat_at: float) -> None:
    with engine.begin() as conn:
        conn.execute(insert(instances_table).values(id=name, host=host, pid=pid, started_at=0.0,
                                                    heartbeat_at=heartbeat_at))


def test_the_sweep_settles_dead_instances_only(database) -> None:  # noqa: F811
    engine = make_engine(database)
    now = time.time()
    me = Instances(engine, "me", lease=30)
    me.register(now)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait(30)
    _instance(engine, "peer", "elsewhere|ns", 1, now - 5)  # another host, heartbeat fresh: alive
    _instance(engine, "silent", "elsewhere|ns", 1, now - 31)  # another host, heartbeat past the lease
    _instance(engine, "gone", host_identity(), exited.pid, now)  # this host, its process has exited
    for name, age in (("me", 0), ("peer", 0), ("silent", 0), ("gone", 0), ("ghost", 31), ("ghost-new", 1)):
        _pending(engine, name, now - age)
    assert me.sweep(now) == 3
    rows = {r["instance"]: r for r in Ledger(engine, "t").rows()}
    assert {n: r["status"] for n, r in rows.items()} == {"me": 0, "peer": 0, "silent": 500, "gone": 500,
                                                         "ghost": 500, "ghost-new": 0}
    assert "no heartbeat for 31s" in rows["silent"]["reason"]
    assert f"(pid {exited.pid}) is gone" in rows["gone"]["reason"]
    assert "not registered" in rows["ghost"]["reason"]
    for name in ("silent", "gone", "ghost"):  # reservation released, delivered usage kept as billed
        r = rows[name]
        assert (r["reserved_tokens"], r["reserved_cost_usd"], r["completion_tokens"], r["cost_usd"]) == (0, 0, 7, 0.01)
    with engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(select(instances_table.c.id))) == ["me", "peer"]
    # a restart under its own name settles its own rows at once; a shutdown settles what is left
    assert Instances(engine, "me", lease=30).register(now + 1) == 1
    _pending(engine, "me", now + 2)
    assert Instances(engine, "me", lease=30).retire() == 1
    reasons = [r["reason"] for r in Ledger(engine, "t").rows() if r["instance"] == "me"]
    assert reasons[0].startswith("settled after gateway restart") and reasons[1].startswith("settled at gateway shutdown")
    engine.dispose()


def test_an_older_ledger_gets_the_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    old = MetaData()
    Table(ledger_table.name, old, *(Column(c.name, c.type, primary_key=c.primary_key) for c in ledger_table.columns
                                    if not c.name.startswith("reserved_")))
    Table("ferry_gateway_keys", old, Column("id", String(32), primary_key=True), Column("n", Integer))
    raw = create_engine(url)
    old.create_all(raw)
    raw.dispose()
    engine = make_engine(url)
    columns = {c["name"] for c in inspect(engine).get_columns(ledger_table.name)}
    assert {"reserved_tokens", "reserved_cost_usd"} <= columns
    assert "ix_ferry_gateway_ledger_status_instance" in {i["name"] for i in inspect(engine).get_indexes(ledger_table.name)}
    engine.dispose()


# ---- cut streams and progress, in-process ------------------------------------------------------------------


def test_a_stream_the_client_cuts_is_billed_for_what_it_delivered(upstreams, gateway) -> None:
    _, srv = upstreams("rack", token_delay=0.05)
    gw = gateway([backend("rack", srv, "onprem", input_per_mtok=PRICE, output_per_mtok=PRICE)])
    secret = gw.create_key(name="k", budget_usd=10)  # a budget: the prompt is counted exactly by the backend
    read = 0
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100,
                            "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            read += '"content": "' in line and '"content": ""' not in line
            if read == 5:
                break
    row = gw.ledger()[0]
    assert row["status"] == 499 and row["prompt_tokens"] == 2 and 5 <= row["completion_tokens"] < 100
    assert row["cost_usd"] == pytest.approx((2 + row["completion_tokens"]) * PRICE / 1e6)
    assert row["reserved_tokens"] == 0


def test_a_stream_shows_its_delivered_tokens_while_it_runs(upstreams, gateway) -> None:
    _, srv = upstreams("rack", token_delay=0.1)
    gw = gateway([backend("rack", srv, "onprem", input_per_mtok=PRICE, output_per_mtok=PRICE)],
                 ledger={"progress_interval": 0.1, "instance_lease": 5})
    secret = gw.create_key(name="k", tpm=10_000)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 40,
                            "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
        gw.wait_for(lambda: gw.gw.ledger.rows()[0]["completion_tokens"] >= 5, what="progress")
        row = gw.gw.ledger.rows()[0]
        assert row["status"] == 0 and row["reserved_tokens"] == 2 + 40 and row["backend"] == "rack"
        assert row["cost_usd"] == pytest.approx((2 + row["completion_tokens"]) * PRICE / 1e6)
        for _ in lines:
            pass
    row = gw.ledger()[0]
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["reserved_tokens"]) == (200, 2, 40, 0)


def _broken_stream_upstream(request: httpx.Request) -> httpx.Response:
    """Three tokens, then the connection breaks (no usage ever comes)."""

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for word in ("one", " two", " three"):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n".encode()
            raise httpx.ReadError("upstream went away")

    if json.loads(request.content).get("stream"):
        return httpx.Response(200, stream=Broken(), headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "four bytes"}, "finish_reason": "stop"}]})


async def test_an_upstream_cut_after_tokens_and_an_answer_without_usage_are_billed(tmp_path: Path) -> None:
    b = {"name": "a", "url": "http://a/v1", "location": "onprem", "kind": "openai", "max_concurrency": 2,
         "input_per_mtok": PRICE, "output_per_mtok": PRICE}
    app = create_app(parse_config(config_dict([b], f"sqlite:///{tmp_path}/gw.db")), ENV,
                     transport=httpx.MockTransport(_broken_stream_upstream))
    gw = app.state.gateway
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                 headers={"Authorization": f"Bearer {MASTER}"}) as c:
        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 200 and "upstream_failed" in r.text
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
    cut, whole = gw.ledger.rows()
    bound = 64 + 8 + len("user") + len("hello")  # the reservation's prompt: no backend counted it
    assert (cut["status"], cut["prompt_tokens"], cut["completion_tokens"]) == (502, bound, 3)
    assert cut["cost_usd"] == pytest.approx((bound + 3) * PRICE / 1e6)
    # no usage in a JSON answer: at most one token per byte of what it returned ("four bytes")
    assert (whole["status"], whole["prompt_tokens"], whole["completion_tokens"]) == (200, bound, 10)
    assert whole["reason"] == "upstream reported no usage"
