"""The usage ledger: one row per request with every decision and its cost, on-prem priced too.

A settlement (``close``) or a refused request's row (``record``) that the database cannot take
because it is unreachable is not lost: it waits in the ledger's backlog, in memory, and the keeper
writes it when the database answers again (``write_backlog``). Until then the admitted request's
row stays pending and keeps holding its reservation, which errs on the side of the limits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, insert, select, update

from ferry.gateway.db import Availability, ledger_table

log = logging.getLogger("ferry.gateway")

CLIENT_CLOSED = 499  # nginx's code for "client closed request"; only ever written to the ledger
GROUP_BY = ("key", "team", "backend", "location", "model", "data_class", "status")


def cost_usd(prompt_tokens: int, completion_tokens: int, input_per_mtok: float, output_per_mtok: float) -> float:
    return (prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok) / 1e6


def held_tokens() -> ColumnElement[Any]:
    """What a row counts against TPM: its reservation while in flight, its usage once settled (the
    larger of the two, so a stream that outgrew its reservation counts what it delivered)."""
    t = ledger_table.c
    used = t.prompt_tokens + t.completion_tokens
    return case((t.reserved_tokens > used, t.reserved_tokens), else_=used)


def held_cost() -> ColumnElement[Any]:
    """What a row counts against budgets, as ``held_tokens`` does for TPM."""
    t = ledger_table.c
    return case((t.reserved_cost_usd > t.cost_usd, t.reserved_cost_usd), else_=t.cost_usd)


def parse_since(value: str | None) -> float | None:
    """Unix seconds or an ISO-8601 time (UTC when it names no zone)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"since: expected unix seconds or an ISO-8601 time, got {value!r}") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@dataclass(frozen=True)
class LedgerRow:
    """Who asked for what, as far as the gateway got: a refused request's whole row, or an admitted
    one's first columns (``Limits.admit`` adds the reservation, ``Outcome`` the rest when it ends).

    Columns left at their defaults are written as such (``NULL``, ``False``), exactly as the
    database's own defaults would be.
    """

    key_id: str | None = None
    key_name: str | None = None
    team: str | None = None
    model: str | None = None  # the public model name
    stream: bool = False
    data_class: str | None = None
    pii: bool = False
    pii_kinds: str | None = None  # comma-separated detector names
    status: int = 0  # HTTP status sent to the client; 0 while in flight
    reason: str | None = None

    def columns(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """How a request ended; written over its pending row."""

    status: int
    backend: str | None = None
    upstream_model: str | None = None
    location: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    reason: str | None = None
    overflow: bool = False
    attempts: int = 0


@dataclass(frozen=True)
class Progress:
    """What an in-flight stream has delivered so far, billed on its row every few seconds so that a
    gateway that dies mid-stream leaves a row the others can settle at what the client got."""

    backend: str
    upstream_model: str
    location: str
    overflow: bool
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class OpenRows:
    """The ids of this instance's admitted rows not settled in the database yet.

    ``Limits.admit`` adds, ``Ledger`` removes once a settlement is written. A pending row of this
    instance that is not here (and is older than the lease) is an orphan: its admission committed but
    the client got a 503 because the commit's answer was lost with the connection; the keeper settles
    it so its reservation does not hold the key's limits until a restart (``Instances.settle_orphans``).

    NOTE: touched from worker threads (every database call runs on one), hence the lock.
    """

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, row_id: int) -> None:
        with self._lock:
            self._ids.add(row_id)

    def discard(self, row_id: int) -> None:
        with self._lock:
            self._ids.discard(row_id)

    def snapshot(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._ids)


# NOTE: refused requests' rows waiting for the database beyond this many are logged and dropped
# (a flood of 401s during an outage must not grow memory without bound); settlements never are.
MAX_WAITING_RECORDS = 10_000


class Ledger:
    def __init__(self, engine: Engine, instance: str, open_rows: OpenRows | None = None,
                 availability: Availability | None = None) -> None:
        self._engine = engine
        self._instance = instance
        self.open_rows = open_rows or OpenRows()
        self.availability = availability or Availability()
        self._lock = threading.Lock()
        self._closes: dict[int, Outcome] = {}  # settlements waiting for the database, by row id
        self._records: list[dict[str, Any]] = []  # refused requests' rows waiting for it

    def record(self, row: LedgerRow) -> int | None:
        """Insert a finished row (a request refused before it was admitted); its id, or None when
        the database is unreachable and the row waits in the backlog."""
        values = {"ts": time.time(), "instance": self._instance, **row.columns()}
        try:
            with self._engine.begin() as conn:
                return int(conn.execute(insert(ledger_table).values(**values)).inserted_primary_key[0])
        except Exception as e:
            cause = self.availability.note(e)
            if cause is None:
                raise
            with self._lock:
                if len(self._records) < MAX_WAITING_RECORDS:
                    self._records.append(values)
                    return None
            log.error("ledger row dropped, database unavailable (%s) and %d rows waiting: %s", cause,
                      MAX_WAITING_RECORDS, json.dumps(values, default=str))
            return None

    def close(self, row_id: int, outcome: Outcome) -> None:
        """Settle a row: the outcome's usage replaces whatever was held or billed so far. With the
        database unreachable the settlement waits in the backlog (the module doc) instead of failing
        a request whose answer is ready.

        NOTE: no ``status = 0`` guard: a row the crash sweep settled while its instance only seemed
        dead (a long pause, a long database outage) gets its real outcome, better than the sweep's guess.
        """
        try:
            with self._engine.begin() as conn:
                self._write_close(conn, row_id, outcome)
        except Exception as e:
            cause = self.availability.note(e)
            if cause is None:
                raise
            with self._lock:
                self._closes[row_id] = outcome
            log.warning("ledger row %d not settled, database unavailable (%s): kept to write when it is back",
                        row_id, cause)
            return
        self.open_rows.discard(row_id)

    @staticmethod
    def _write_close(conn: Any, row_id: int, outcome: Outcome) -> None:
        values = {**vars(outcome), "reserved_tokens": 0, "reserved_cost_usd": 0.0}
        conn.execute(update(ledger_table).where(ledger_table.c.id == row_id).values(**values))

    @property
    def backlog(self) -> int:
        """Settlements and rows waiting for the database."""
        with self._lock:
            return len(self._closes) + len(self._records)

    def write_backlog(self) -> int:
        """Write what waits for the database in one transaction; how many. Raises (and keeps it all)
        when the database still does not answer."""
        with self._lock:
            closes, records = dict(self._closes), list(self._records)
        if not closes and not records:
            return 0
        with self._engine.begin() as conn:
            for row_id, outcome in closes.items():
                self._write_close(conn, row_id, outcome)
            if records:
                conn.execute(insert(ledger_table), records)
        with self._lock:
            for row_id, outcome in closes.items():
                if self._closes.get(row_id) is outcome:
                    del self._closes[row_id]
            del self._records[:len(records)]
        for row_id in closes:
            self.open_rows.discard(row_id)
        return len(closes) + len(records)

    def log_backlog(self) -> None:
        """At shutdown with the database still away: what could not be written, one line per row,
        so that it can be entered by hand (the rows themselves are settled by the next start)."""
        with self._lock:
            closes, records = dict(self._closes), list(self._records)
        for row_id, outcome in closes.items():
            log.error("unsettled ledger row %d: %s", row_id, json.dumps(vars(outcome), default=str))
        for values in records:
            log.error("unwritten ledger row: %s", json.dumps(values, default=str))

    def write_progress(self, progress: Mapping[int, Progress]) -> None:
        """Bill in-flight rows what they have delivered so far, in one transaction.

        NOTE: only rows still pending: a stream's final ``close`` may commit first, and a late progress
        write must not put back older numbers over its outcome.
        """
        if not progress:
            return
        t = ledger_table.c
        with self._engine.begin() as conn:
            for row_id, p in progress.items():
                conn.execute(update(ledger_table).where(t.id == row_id, t.status == 0).values(**asdict(p)))

    def rows(self, since: float | None = None) -> list[dict[str, Any]]:
        q = select(ledger_table).order_by(ledger_table.c.id)
        if since is not None:
            q = q.where(ledger_table.c.ts >= since)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def usage(self, group_by: str = "key", since: float | None = None) -> list[dict[str, Any]]:
        """Requests, tokens, cost and overflow count per group, biggest spend first."""
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by: must be one of {GROUP_BY}, got {group_by!r}")
        col = ledger_table.c.key_name if group_by == "key" else ledger_table.c[group_by]
        t = ledger_table.c
        q = select(
            col.label("group"),
            func.count().label("requests"),
            func.sum(case((t.status == 200, 1), else_=0)).label("ok"),
            func.coalesce(func.sum(t.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(t.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(t.cost_usd), 0.0).label("cost_usd"),
            func.sum(case((t.overflow.is_(True), 1), else_=0)).label("overflow"),
            func.coalesce(func.sum(t.reserved_cost_usd), 0.0).label("reserved_usd"),
        ).group_by(col).order_by(func.coalesce(func.sum(t.cost_usd), 0.0).desc())
        if since is not None:
            q = q.where(t.ts >= since)
        with self._engine.connect() as conn:
            out = []
            for r in conn.execute(q):
                d = dict(r._mapping)
                d["ok"] = int(d["ok"] or 0)
                d["overflow"] = int(d["overflow"] or 0)
                d["prompt_tokens"] = int(d["prompt_tokens"])
                d["completion_tokens"] = int(d["completion_tokens"])
                d["cost_usd"] = float(d["cost_usd"])
                d["reserved_usd"] = float(d["reserved_usd"])  # held by requests still in flight
                out.append(d)
        return out


def format_usage(group_by: str, rows: list[dict[str, Any]]) -> str:
    header = f"{group_by:<24} {'requests':>9} {'ok':>6} {'prompt':>10} {'completion':>11} {'cost_usd':>12} {'overflow':>9}"
    lines = [header]
    for r in rows:
        lines.append(f"{str(r['group']):<24} {r['requests']:>9} {r['ok']:>6} {r['prompt_tokens']:>10} "
                     f"{r['completion_tokens']:>11} {r['cost_usd']:>12.6f} {r['overflow']:>9}")
    return "\n".join(lines)
