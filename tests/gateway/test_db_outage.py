"""The gateway and its database going away: at start-up, one line and exit 2; while serving, 503s
that name the cause, `/health` degraded, no settlement lost, and recovery when the database returns.

"Database lost" is real: a loopback TCP proxy sits between the gateway (a subprocess) and PostgreSQL;
it stops accepting and cuts every connection, then accepts again on the same port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from ferry_server import free_port
from gateway.conftest import ENV, MASTER, backend, config_dict
from gateway.databases import postgres  # noqa: F401  (fixture)
from gateway.gateway_process import GatewayProcess
from sqlalchemy import create_engine, func, make_url, select
from sqlalchemy.exc import OperationalError

from ferry.gateway.db import ledger_table, make_engine, normalize_url
from ferry.gateway.ledger import Ledger, LedgerRow, OpenRows, Outcome
from ferry.gateway.limits import Estimate, Limits
from ferry.gateway.recovery import Instances

# --------------------------------------------------------------------------------------- helpers


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``. ``stop`` closes the listener (new connections are
    refused) and cuts the live ones; ``resume`` listens on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.resume()

    def resume(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # NOTE: wakes the accept() blocked in the thread
            except OSError:
                pass
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _cut(s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _cut(src)
            _cut(dst)


def _cut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_gateway(config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """`ferry gateway serve` expected to exit by itself (start-up failures)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "ferry.cli", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1",
           "--port", str(free_port())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **ENV, **(env or {})})


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = lines[0]
    assert line.startswith("error: database ")
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def upstream(upstreams: Any) -> tuple[Any, Any]:
    return upstreams("onprem")


def gateway_config(server: Any, database: str) -> dict[str, Any]:
    return config_dict([backend("onprem", server, "onprem", max_concurrency=8)], database,
                       ledger={"progress_interval": 0.2, "instance_lease": 5.0})


# ------------------------------------------------------------------------------------ start-up


def test_unreachable_postgres_at_start_is_one_line_and_exit_2(upstream: Any, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    done = run_gateway(gateway_config(upstream[1], f"postgresql://ferry:s3cret@127.0.0.1:{closed}/ledger"), tmp_path)
    line = assert_one_line_exit_2(done, f"127.0.0.1:{closed}", "connection refused")
    assert "s3cret" not in line  # the password never reaches a log


def test_sqlite_in_a_missing_directory_is_one_line_and_exit_2(upstream: Any, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/no/such/dir/ledger.db"
    done = run_gateway(gateway_config(upstream[1], database), tmp_path)
    assert_one_line_exit_2(done, "no/such/dir/ledger.db", "unable to open database file")


def test_missing_postgres_driver_says_what_to_install(upstream: Any, tmp_path: Path) -> None:
    # a psycopg that cannot be imported, first on the path: as if the extra were not installed
    fake = tmp_path / "site" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n")
    done = run_gateway(gateway_config(upstream[1], "postgresql://ferry@127.0.0.1:5432/ledger"), tmp_path,
                       env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_one_line_exit_2(done, "driver is not installed", "pip install 'ferry[postgres]'")


@pytest.mark.parametrize("database, needle", [("postgresql+nodriver://ferry@127.0.0.1/ledger", "'postgresql+nodriver'"),
                                              ("mysql://ferry@127.0.0.1/ledger", "sqlite:///PATH or postgresql")])
def test_unknown_scheme_or_driver_is_one_line_and_exit_2(upstream: Any, tmp_path: Path, database: str,
                                                         needle: str) -> None:
    done = run_gateway(gateway_config(upstream[1], database), tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "database" in lines[0] and needle in lines[0]


def test_unknown_postgres_database_is_one_line_and_exit_2(upstream: Any, tmp_path: Path) -> None:
    base = os.environ.get("FERRY_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("PostgreSQL not available: set FERRY_TEST_POSTGRES_URL=postgresql://user@host:port/db")
    url = make_url(base).set(database="ferry_no_such_database").render_as_string(hide_password=False)
    done = run_gateway(gateway_config(upstream[1], url), tmp_path)
    assert_one_line_exit_2(done, 'database "ferry_no_such_database" does not exist')


# ------------------------------------------------------------------------------------- outage


@pytest.fixture
def proxied(postgres: str) -> Iterator[tuple[TcpProxy, str, str]]:  # noqa: F811
    """(proxy, the gateway's URL through it, the direct URL), both on this test's schema."""
    direct = make_url(postgres)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
    try:
        yield proxy, direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), postgres
    finally:
        proxy.stop()


def ledger_rows(url: str) -> list[dict[str, Any]]:
    engine = create_engine(normalize_url(url))
    try:
        return Ledger(engine, "reader").rows()
    finally:
        engine.dispose()


def health(gw: GatewayProcess) -> dict[str, Any]:
    return httpx.get(gw.url + "/health", timeout=10).json()  # type: ignore[no-any-return]


def test_database_lost_while_serving(upstream: Any, proxied: tuple[TcpProxy, str, str], tmp_path: Path) -> None:
    state, server = upstream
    proxy, through_proxy, direct = proxied
    gw = GatewayProcess(gateway_config(server, through_proxy), tmp_path, "outage").start()
    try:
        key = gw.create_key(name="team-key", budget_usd=100.0, tpm=1_000_000)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
        master = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "hello there"}]
        assert client.chat.completions.create(model="chat", messages=messages, max_tokens=3).usage.completion_tokens == 3
        assert health(gw)["database"]["up"] is True

        # two requests in flight when the database goes: a stream and a plain answer, both slow
        state.token_delay = 0.15
        results: dict[str, Any] = {}

        def stream() -> None:
            chunks = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, stream=True)
            results["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        def plain() -> None:
            results["plain"] = client.completions.create(model="chat", prompt="slow one", max_tokens=12)

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        wait_for(lambda: state.running == 2, "both requests upstream")
        proxy.stop()

        # meanwhile: requests that need the database are 503s that say why, for virtual keys
        # (authentication reads the key) and for the master key (admission writes the ledger) alike
        for who in (client, master):
            with pytest.raises(openai.APIStatusError) as err:
                who.chat.completions.create(model="chat", messages=messages, max_tokens=3)
            assert err.value.status_code == 503
            error = err.value.body
            assert isinstance(error, dict) and error["code"] == "database_unavailable"
            assert error["message"].startswith("ledger database unavailable: ")
            assert "connection refused" in error["message"] or "closed" in error["message"], error["message"]
        # the admin API too
        assert gw.admin.get("/admin/keys").status_code == 503

        for t in threads:
            t.join(30)
        # the two answers reached their clients whole: the upstream was fine, only the ledger was away
        assert len(results["stream"].split()) == 12
        assert results["plain"].usage.completion_tokens == 12
        wait_for(lambda: health(gw)["database"]["waiting_writes"] == 2, "settlements waiting")
        h = health(gw)
        assert h["status"] == "degraded" and h["database"]["up"] is False
        assert "connection refused" in h["database"]["error"]
        assert gw.proc is not None and gw.proc.poll() is None  # still serving

        # the database returns: the waiting settlements land, and requests succeed with no restart
        proxy.resume()
        wait_for(lambda: health(gw)["status"] == "ok", "health ok")
        database = health(gw)["database"]
        assert database["up"] is True and database["error"] is None and database["waiting_writes"] == 0
        state.token_delay = 0.0
        assert client.chat.completions.create(model="chat", messages=messages, max_tokens=4).usage.completion_tokens == 4
        assert gw.admin.get("/admin/keys").status_code == 200
    finally:
        gw.stop()

    rows = ledger_rows(direct)
    assert all(r["status"] != 0 for r in rows), [r for r in rows if r["status"] == 0]
    assert all(r["reserved_tokens"] == 0 and r["reserved_cost_usd"] == 0 for r in rows)
    served = [r for r in rows if r["status"] == 200]
    assert len(served) == 4  # before, the stream, the plain answer, after: no 503 left a row behind
    assert sorted(r["completion_tokens"] for r in served) == [3, 4, 12, 12]
    # every token the upstream generated is billed: nothing accounted was lost in the outage
    assert sum(r["completion_tokens"] for r in served) == state.completion_tokens_total
    assert sum(r["prompt_tokens"] for r in served) == state.prompt_tokens_total
    assert all(r["reason"] is None for r in served)


# ------------------------------------------------------------------------ the pieces, in process


def test_settlements_wait_for_the_database_and_orphans_are_settled(proxied: tuple[TcpProxy, str, str]) -> None:
    proxy, through_proxy, direct = proxied
    engine = make_engine(through_proxy)
    open_rows = OpenRows()
    ledger = Ledger(engine, "me", open_rows)
    limits = Limits(engine, "me", {}, open_rows)
    instances = Instances(engine, "me", lease=5.0)
    try:
        held = limits.admit(None, LedgerRow(key_id="master"), Estimate(10, 20, 0.5))
        orphan = limits.admit(None, LedgerRow(key_id="master"), Estimate(10, 20, 0.5), now=time.time() - 60)
        open_rows.discard(orphan.row_id)  # as if its commit's answer had been lost: its client got a 503
        proxy.stop()
        ledger.close(held.row_id, Outcome(200, prompt_tokens=7, completion_tokens=9, cost_usd=0.25))
        assert ledger.record(LedgerRow(key_id="x", status=401, reason="bad key")) is None
        assert ledger.backlog == 2 and ledger.availability.cause is not None
        with pytest.raises(OperationalError):
            ledger.write_backlog()
        assert ledger.backlog == 2  # kept for the next try
        proxy.resume()
        assert ledger.write_backlog() == 2 and ledger.backlog == 0
        assert held.row_id not in open_rows.snapshot()
        assert instances.settle_orphans(open_rows.snapshot()) == 1
    finally:
        engine.dispose()
    rows = {r["id"]: r for r in ledger_rows(direct)}
    assert rows[held.row_id]["status"] == 200 and rows[held.row_id]["completion_tokens"] == 9
    assert rows[orphan.row_id]["status"] == 503 and rows[orphan.row_id]["reserved_tokens"] == 0
    assert [r["status"] for r in rows.values()].count(401) == 1
    engine = create_engine(normalize_url(direct))
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).where(ledger_table.c.status == 0)).scalar_one() == 0
    finally:
        engine.dispose()


def test_gateways_starting_at_once_on_a_fresh_postgres_all_start(postgres: str) -> None:
    # NOTE: without the schema lock, concurrent create_all calls collide in PostgreSQL's type catalogue
    errors: list[BaseException] = []

    def start() -> None:
        try:
            make_engine(postgres).dispose()
        except BaseException as e:  # noqa: BLE001  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
