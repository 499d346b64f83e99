"""A pending reservation left by a gateway that crashed and never came back expires: a live peer on the same
database settles it once the dead instance's lease has run out, and the key's budget recovers."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
from gateway.conftest import backend, config_dict
from gateway.databases import database, ledger_rows  # noqa: F401  (database: a fixture)
from gateway.gateway_process import GatewayProcess
from sqlalchemy import update

from ferry.gateway.db import instances_table, make_engine

PRICE = 1000.0  # USD per million tokens in and out: $0.001 a token
LEASE = 4.0  # seconds without a heartbeat after which an instance is dead


def _move_to_another_host(url: str, instance: str) -> None:
    """Make ``instance`` look as if it ran on another machine: its PID then proves nothing, only its
    heartbeat's age can say it died (the case of a peer gateway on another node)."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            done = conn.execute(update(instances_table).where(instances_table.c.id == instance)
                                .values(host="another-node|pid:[1]")).rowcount
        assert done == 1
    finally:
        engine.dispose()


async def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _ask(url: str, secret: str) -> dict[str, Any]:
    return {"url": url + "/v1/chat/completions", "headers": {"Authorization": f"Bearer {secret}"},
            "json": {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}}


async def test_a_live_peer_settles_a_dead_instances_row_after_the_lease(
        upstreams, database, tmp_path: Path) -> None:  # noqa: F811
    _, srv = upstreams("rack", token_delay=0.2)
    config = config_dict([backend("rack", srv, "onprem", timeout=30, input_per_mtok=PRICE, output_per_mtok=PRICE)],
                         database, ledger={"progress_interval": 0.2, "instance_lease": LEASE})
    a, b = GatewayProcess(config, tmp_path, "a"), GatewayProcess(config, tmp_path, "b")
    try:
        # NOTE: one after the other: two first starts at once race to create the tables on PostgreSQL
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(b.start)
        _move_to_another_host(database, "a")
        # one stream reserves 2 prompt + 200 completion tokens = $0.202, past the key's $0.15
        secret = a.create_key(name="k", budget_usd=0.15)
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            r = await stack.enter_async_context(http.stream(
                "POST", a.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                json={"model": "chat", "messages": [{"role": "user", "content": "tell"}], "max_tokens": 200,
                      "stream": True}))
            assert r.status_code == 200
            lines = r.aiter_lines()
            seen = 0
            while seen < 3:
                line = await anext(lines)
                seen += '"content": "' in line and '"content": ""' not in line
            await _wait(lambda: any(row["completion_tokens"] >= 3 for row in ledger_rows(database)), "progress on the row")
            a.kill()  # SIGKILL mid-stream: the row stays pending, holding its reservation
            (row,) = [row for row in ledger_rows(database) if row["instance"] == "a"]
            assert row["status"] == 0 and row["reserved_cost_usd"] > 0.15
            refused = await http.post(**_ask(b.url, secret))
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
        # the live peer settles it once a's heartbeat is older than the lease
        await _wait(lambda: next(r for r in ledger_rows(database) if r["instance"] == "a")["status"] != 0, "the sweep")
        (row,) = [r for r in ledger_rows(database) if r["instance"] == "a"]
        assert row["status"] == 500 and "sent no heartbeat" in row["reason"], row["reason"]
        assert row["reserved_tokens"] == 0 and row["reserved_cost_usd"] == 0
        assert 3 <= row["completion_tokens"] < 200  # billed what reached the client by the last progress write
        assert row["cost_usd"] < 0.15
        async with httpx.AsyncClient(timeout=30) as http:
            ok = await http.post(**_ask(b.url, secret))  # the budget recovered
        assert ok.status_code == 200, ok.text
    finally:
        a.stop()
        b.stop()
