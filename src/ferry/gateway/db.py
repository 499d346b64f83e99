"""The gateway's database: virtual keys and the usage ledger (SQLAlchemy 2 Core).

SQLite (embedded, the default) serves one gateway; PostgreSQL serves several instances that share
limits, budgets and the ledger. Both sit behind the same tables; nothing here holds module state.
"""

from __future__ import annotations

import re
import time

from sqlalchemy import (Boolean, Column, Engine, Float, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, make_url, text)
from sqlalchemy.exc import (ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError,
                            ProgrammingError, SQLAlchemyError)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import StaticPool

metadata = MetaData()

keys_table = Table(
    "ferry_gateway_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("team", String(200), nullable=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(32), nullable=False),
    Column("models", Text, nullable=True),  # JSON list; NULL = every model
    Column("data_class", String(64), nullable=True),  # NULL = the config's default
    Column("budget_usd", Float, nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
)

ledger_table = Table(
    "ferry_gateway_ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),  # unix seconds when the request arrived
    Column("key_id", String(32), nullable=True),
    Column("key_name", String(200), nullable=True),
    Column("team", String(200), nullable=True),
    Column("model", String(200), nullable=True),  # the public model name
    Column("backend", String(200), nullable=True),
    Column("upstream_model", String(200), nullable=True),
    Column("location", String(16), nullable=True),
    Column("data_class", String(64), nullable=True),
    Column("pii", Boolean, nullable=False, default=False),
    Column("pii_kinds", String(200), nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("admitted", Boolean, nullable=False, default=False),  # counted against RPM/TPM
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("ttft_s", Float, nullable=True),
    Column("latency_s", Float, nullable=True),
    Column("status", Integer, nullable=False),  # HTTP status sent to the client; 0 while in flight
    Column("reason", Text, nullable=True),
    Column("overflow", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("instance", String(64), nullable=True),
    # NOTE: what an in-flight request holds against TPM and budgets (its most possible usage); 0 once
    # settled. The usage columns above say what was billed: for a stream in flight, what it has
    # delivered so far. Limits count the larger of the two per row.
    Column("reserved_tokens", Integer, nullable=False, default=0, server_default="0"),
    Column("reserved_cost_usd", Float, nullable=False, default=0.0, server_default="0"),
)
Index("ix_ferry_gateway_ledger_key_ts", ledger_table.c.key_id, ledger_table.c.ts)
Index("ix_ferry_gateway_ledger_team_ts", ledger_table.c.team, ledger_table.c.ts)
# NOTE: the crash sweep looks for pending rows (status 0) every few seconds; without this it would
# scan the whole ledger.
Index("ix_ferry_gateway_ledger_status_instance", ledger_table.c.status, ledger_table.c.instance)

# One row per live gateway instance, refreshed every ledger.progress_interval; a row gone stale means
# its instance died and its pending ledger rows may be settled by the others (recovery.py).
instances_table = Table(
    "ferry_gateway_instances", metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),  # hostname + PID namespace: where ``pid`` means something
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)


# NOTE: seconds a PostgreSQL connect may take before it fails; without it, a host that drops packets
# holds a request (or the start-up) for the operating system's TCP timeout, minutes.
CONNECT_TIMEOUT_S = 5


class DatabaseError(Exception):
    """The database cannot be used: one line naming the database (no password) and the cause."""


class Availability:
    """Whether the database answered lately, and if not, why: what ``/health`` reports.

    Any failed call marks it down at once; only the keeper's round (every ``ledger.progress_interval``)
    marks it up again, since a call that succeeds says nothing of the writes still waiting.
    NOTE: written from worker threads and read on the event loop; one tuple, replaced whole.
    """

    def __init__(self) -> None:
        self._state: tuple[str | None, float | None] = (None, None)  # (cause, down since)

    def down(self, cause: str) -> None:
        since = self._state[1]
        self._state = (cause, since if since is not None else time.time())

    def up(self) -> None:
        self._state = (None, None)

    def note(self, exc: BaseException) -> str | None:
        """When ``exc`` says the database is unreachable, mark it down and return the cause; None
        when it is some other error (the caller raises it on)."""
        cause = unavailable_cause(exc)
        if cause is not None:
            self.down(cause)
        return cause

    @property
    def cause(self) -> str | None:
        return self._state[0]

    @property
    def down_since(self) -> float | None:
        return self._state[1]


def redact(url: str) -> str:
    """The URL with its password hidden, fit for a log line or an error message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def unavailable_cause(exc: BaseException) -> str | None:
    """Why the database cannot be reached, in a few words, or None when ``exc`` is not about that
    (a bug of ours, a constraint: those stay errors, not outages).

    NOTE: OperationalError covers a refused or dropped connection, a server shutting down, a failed
    login and SQLite's "unable to open database file"; InterfaceError a connection already closed;
    a pool timeout every connection busy or hanging.
    """
    if isinstance(exc, PoolTimeoutError):
        return "no connection free in the pool"
    if isinstance(exc, (OperationalError, InterfaceError)) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return _cause(exc)
    return None


_NOISE = (re.compile(r"^connection failed:\s*"), re.compile(r'^connection to server at "[^"]*"(, port \d+)? failed:\s*'),
          re.compile(r"^(FATAL|ERROR):\s*"))


def _cause(exc: BaseException) -> str:
    """The driver's message, first line, without libpq's prefixes: "connection refused",
    'database "x" does not exist', "server closed the connection unexpectedly", ..."""
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip()
    line = message.splitlines()[0].strip() if message else ""
    for pattern in _NOISE:
        line = pattern.sub("", line)
    if not line:
        return type(orig if orig is not None else exc).__name__
    if len(line) > 1 and line[0].isupper() and line[1].islower():
        line = line[0].lower() + line[1:]  # "Connection refused" reads as one clause after a colon
    return line[:300]


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver the project installs)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str) -> Engine:
    """An engine with the tables created; SQLite writers serialize with BEGIN IMMEDIATE.

    Raises ``DatabaseError`` (one line) when the URL names no usable driver or the database cannot
    be reached or set up: ``ferry gateway`` prints it and exits 2.
    """
    where = redact(url)
    try:
        engine = _create_engine(normalize_url(url))
    except ImportError as e:  # NOTE: also psycopg without its libpq ("no pq wrapper available")
        hint = " (pip install 'ferry[postgres]')" if url.startswith("postgresql") else ""
        raise DatabaseError(f"database {where}: its driver is not installed: {e}{hint}") from e
    except NoSuchModuleError as e:
        raise DatabaseError(f"database {where}: unknown scheme or driver {make_url(url).drivername!r}") from e
    except ArgumentError as e:  # a malformed URL
        raise DatabaseError(f"database {where}: {str(e).splitlines()[0]}") from e
    try:
        _create_tables(engine)
        _add_missing_columns(engine)
    except SQLAlchemyError as e:
        engine.dispose()
        cause = unavailable_cause(e) or f"{type(e).__name__}: {_cause(e)}"
        raise DatabaseError(f"database {where}: {cause}") from e
    return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if memory else None)

        # NOTE: pysqlite opens transactions lazily and only before writes, so a check-then-insert
        # (admission under an RPM limit) could interleave between two gateways on one file. Taking the
        # write lock at BEGIN makes each admission atomic, as SELECT … FOR UPDATE does on PostgreSQL.
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None
            if not memory:
                dbapi_conn.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        # NOTE: pool_pre_ping tests each connection as it leaves the pool, so after the database comes
        # back the first request gets a fresh connection instead of the dead one; a failed ping drops
        # the whole pool's connections from before it.
        connect_args = {}
        if url.startswith("postgresql") and "connect_timeout" not in make_url(url).query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10,
                               connect_args=connect_args)
    return engine


# NOTE: any fixed number; it names the lock of ferry's schema set-up among PostgreSQL's advisory locks
_SCHEMA_LOCK = 0x66657272


def _create_tables(engine: Engine) -> None:
    """``create_all``; on PostgreSQL under an advisory lock, since two gateways starting at once on a
    fresh database would both create the tables and one fail on PostgreSQL's type catalogue."""
    if engine.dialect.name != "postgresql":
        metadata.create_all(engine)
        return
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        metadata.create_all(conn)


def _add_missing_columns(engine: Engine) -> None:
    """Bring a ledger made by an older ferry up to date: add its new columns and indexes.

    NOTE: ``create_all`` skips tables that exist, so a database from before the reservation columns
    would fail every admission. Only additive changes with defaults are made, and two instances
    starting at once may race: the loser's "already exists" is expected and ignored.
    """
    have = {c["name"] for c in inspect(engine).get_columns(ledger_table.name)}
    for name in ("reserved_tokens", "reserved_cost_usd"):
        if name in have:
            continue
        column = ledger_table.c[name]
        ddl = (f"ALTER TABLE {ledger_table.name} ADD COLUMN {name} "
               f"{column.type.compile(engine.dialect)} NOT NULL DEFAULT 0")
        try:
            with engine.begin() as conn:
                conn.execute(text(ddl))
        except (OperationalError, ProgrammingError):
            if name not in {c["name"] for c in inspect(engine).get_columns(ledger_table.name)}:
                raise
    for index in ledger_table.indexes:
        try:
            index.create(engine, checkfirst=True)
        except (OperationalError, ProgrammingError):
            if index.name not in {i["name"] for i in inspect(engine).get_indexes(ledger_table.name)}:
                raise
