"""What the console reads from the ledger: filtered rows, their CSV, decisions over time, spend per key.

Blocking SQLAlchemy Core calls, run through ``Gateway.db`` (a worker thread) like the admin API's.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Select,
    and_,
    case,
    cast,
    func,
    or_,
    select,
)

from ferry.gateway.db import ledger_table
from ferry.gateway.ledger import parse_since

# NOTE: "all" has no start; the charts need one, so they offer the bounded periods only.
PERIODS: dict[str, float | None] = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0,
                                    "all": None}
CHART_PERIODS = ("1h", "24h", "7d", "30d")
STATUSES = ("", "ok", "error", "pending")  # besides an exact HTTP status
PAGE_SIZE = 100
BUCKETS = 48  # points on a chart over any period
CSV_BATCH = 1000


def period_start(period: str, now: float | None = None) -> float | None:
    """Unix seconds where ``period`` (a key of ``PERIODS``) starts; None for "all"."""
    if period not in PERIODS:
        raise ValueError(f"period: must be one of {list(PERIODS)}, got {period!r}")
    length = PERIODS[period]
    return None if length is None else (time.time() if now is None else now) - length


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class LedgerFilter:
    """The ledger page's filters; empty strings mean "any". Raises ValueError naming a bad field."""

    key: str = ""  # a key's name or id
    team: str = ""
    backend: str = ""
    status: str = ""  # ok | error | pending | an HTTP status
    period: str = "24h"
    since: str = ""  # unix seconds or ISO-8601; overrides the period's start
    until: str = ""
    before: int | None = None  # rows older than this id (the next page)

    def __post_init__(self) -> None:
        if self.status not in STATUSES and not (self.status.isdigit() and len(self.status) <= 3):
            raise ValueError(f"status: must be one of {list(STATUSES[1:])} or an HTTP status, got {self.status!r}")
        period_start(self.period)
        parse_since(self.since)
        try:
            parse_since(self.until)
        except ValueError as e:
            raise ValueError(str(e).replace("since:", "until:", 1)) from e

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> LedgerFilter:
        before = params.get("before", "")
        if before and not before.isdigit():
            raise ValueError(f"before: must be a row id, got {before!r}")
        return cls(key=params.get("key", "").strip(), team=params.get("team", "").strip(),
                   backend=params.get("backend", "").strip(), status=params.get("status", "").strip(),
                   period=params.get("period", "24h") or "24h", since=params.get("since", "").strip(),
                   until=params.get("until", "").strip(), before=int(before) if before else None)

    def query_string(self, **override: object) -> str:
        """These filters as a URL query (for the CSV link and the next page)."""
        values = {"key": self.key, "team": self.team, "backend": self.backend, "status": self.status,
                  "period": self.period, "since": self.since, "until": self.until,
                  "before": "" if self.before is None else str(self.before), **override}
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})

    def conditions(self, now: float | None = None) -> list[ColumnElement[bool]]:
        t = ledger_table.c
        out: list[ColumnElement[bool]] = []
        if self.key:
            out.append(or_(t.key_name == self.key, t.key_id == self.key))
        if self.team:
            out.append(t.team == self.team)
        if self.backend:
            out.append(t.backend == self.backend)
        if self.status == "ok":
            out.append(and_(t.status >= 200, t.status < 300))
        elif self.status == "error":
            out.append(t.status >= 400)
        elif self.status == "pending":
            out.append(t.status == 0)
        elif self.status:
            out.append(t.status == int(self.status))
        start = parse_since(self.since) if self.since else period_start(self.period, now)
        if start is not None:
            out.append(t.ts >= start)
        end = parse_since(self.until)
        if end is not None:
            out.append(t.ts < end)
        if self.before is not None:
            out.append(t.id < self.before)
        return out

    def select(self, now: float | None = None) -> Select[Any]:
        return select(ledger_table).where(*self.conditions(now)).order_by(ledger_table.c.id.desc())


def ledger_page(engine: Engine, f: LedgerFilter, limit: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """The newest ``limit`` rows that match, newest first."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(f.select().limit(limit))]


CSV_COLUMNS = ("time_utc", *(c.name for c in ledger_table.columns))


def _cell(value: Any) -> Any:
    # NOTE: a spreadsheet runs a cell that starts with = + - @ as a formula; key names and upstream
    # error reasons are text others chose, so they are defused with a leading quote.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def ledger_csv(engine: Engine, f: LedgerFilter) -> Iterator[str]:
    """Every matching row as CSV (header first), newest first, read in batches; blocking."""
    buf = io.StringIO()
    writer = csv.writer(buf)

    def flush() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    writer.writerow(CSV_COLUMNS)
    yield flush()
    query = f.select().execution_options(yield_per=CSV_BATCH)
    with engine.connect() as conn:
        for n, r in enumerate(conn.execute(query), 1):
            m = r._mapping
            writer.writerow([iso(m["ts"]), *(_cell(m[c]) for c in CSV_COLUMNS[1:])])
            if n % CSV_BATCH == 0:
                yield flush()
    yield flush()


@dataclass
class Timeline:
    """Routing decisions per time bucket: where requests went, the overflow share, data classes."""

    start: float
    width: float  # seconds per bucket
    labels: list[str] = field(default_factory=list)
    onprem: list[int] = field(default_factory=list)
    cloud: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # never reached a backend (limits, data class, ...)
    overflow: list[int] = field(default_factory=list)
    share: list[float | None] = field(default_factory=list)  # overflow / routed, in %; None without traffic
    data_classes: dict[str, list[int]] = field(default_factory=dict)

    def chart(self) -> dict[str, Any]:
        return {"labels": self.labels, "onprem": self.onprem, "cloud": self.cloud, "refused": self.refused,
                "share": self.share, "data_classes": self.data_classes}


def _bucket(engine: Engine, start: float, width: float) -> ColumnElement[Any]:
    offset = (ledger_table.c.ts - start) / width
    # NOTE: rows are at or after ``start``, so truncation is the floor; SQLite's CAST truncates, but
    # PostgreSQL's rounds, and SQLite may be built without floor().
    if engine.dialect.name == "sqlite":
        return cast(offset, Integer)
    return cast(func.floor(offset), Integer)


def timeline(engine: Engine, period: str, now: float | None = None, buckets: int = BUCKETS) -> Timeline:
    """Requests per bucket of ``period`` (one of ``CHART_PERIODS``), grouped in the database."""
    if period not in CHART_PERIODS:
        raise ValueError(f"period: must be one of {list(CHART_PERIODS)}, got {period!r}")
    now = time.time() if now is None else now
    length = PERIODS[period]
    assert length is not None  # NOTE: CHART_PERIODS are bounded
    start, width = now - length, length / buckets
    t = ledger_table.c
    bucket = _bucket(engine, start, width).label("bucket")
    fmt = "%H:%M" if length <= 86400 else "%m-%d %H:%M"
    tl = Timeline(start, width, labels=[datetime.fromtimestamp(start + i * width, timezone.utc).strftime(fmt)
                                        for i in range(buckets)],
                  onprem=[0] * buckets, cloud=[0] * buckets, refused=[0] * buckets, overflow=[0] * buckets)
    q = (select(bucket, t.location, t.data_class,
                func.count().label("n"),
                func.sum(case((t.overflow.is_(True), 1), else_=0)).label("overflow"))
         .where(t.ts >= start, t.ts <= now).group_by(bucket, t.location, t.data_class))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    for r in rows:
        i = min(int(r.bucket), buckets - 1)
        n = int(r.n)
        where = {"onprem": tl.onprem, "cloud": tl.cloud}.get(r.location, tl.refused)
        where[i] += n
        tl.overflow[i] += int(r.overflow or 0)
        dc = r.data_class or "(none)"
        tl.data_classes.setdefault(dc, [0] * buckets)[i] += n
    for i in range(buckets):
        routed = tl.onprem[i] + tl.cloud[i]
        tl.share.append(round(100.0 * tl.overflow[i] / routed, 1) if routed else None)
    return tl


def data_class_decisions(engine: Engine, since: float | None) -> list[dict[str, Any]]:
    """Per data class: requests kept on-prem, sent to the cloud (overflowing or not), refused, with PII."""
    t = ledger_table.c
    q = select(t.data_class,
               func.count().label("requests"),
               func.sum(case((t.location == "onprem", 1), else_=0)).label("onprem"),
               func.sum(case((t.location == "cloud", 1), else_=0)).label("cloud"),
               func.sum(case((t.overflow.is_(True), 1), else_=0)).label("overflow"),
               func.sum(case((t.location.is_(None), 1), else_=0)).label("refused"),
               func.sum(case((t.pii.is_(True), 1), else_=0)).label("pii"),
               ).group_by(t.data_class).order_by(func.count().desc())
    if since is not None:
        q = q.where(t.ts >= since)
    with engine.connect() as conn:
        return [{k: (int(v or 0) if k != "data_class" else v) for k, v in r._mapping.items()}
                for r in conn.execute(q)]


def overflow_share(row: Mapping[str, Any]) -> float | None:
    """Percent of the routed requests of a ``data_class_decisions`` row that overflowed."""
    routed = row["onprem"] + row["cloud"]
    return None if not routed else round(100.0 * row["overflow"] / routed, 1)


def spend_by_key(engine: Engine) -> dict[str, float]:
    """What each key has been billed so far, by key id (its budget also counts what requests in flight hold)."""
    t = ledger_table.c
    q = select(t.key_id, func.coalesce(func.sum(t.cost_usd), 0.0)).where(t.key_id.is_not(None)).group_by(t.key_id)
    with engine.connect() as conn:
        return {k: float(v) for k, v in conn.execute(q)}
