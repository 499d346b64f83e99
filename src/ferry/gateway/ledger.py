"""The usage ledger: one row per request with every decision and its cost, on-prem priced too."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, insert, select, update

from ferry.gateway.db import ledger_table

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


class Ledger:
    def __init__(self, engine: Engine, instance: str) -> None:
        self._engine = engine
        self._instance = instance

    def record(self, row: LedgerRow) -> int:
        """Insert a finished row (a request refused before it was admitted)."""
        values = {"ts": time.time(), "instance": self._instance, **row.columns()}
        with self._engine.begin() as conn:
            return int(conn.execute(insert(ledger_table).values(**values)).inserted_primary_key[0])

    def close(self, row_id: int, outcome: Outcome) -> None:
        """Settle a row: the outcome's usage replaces whatever was held or billed so far.

        NOTE: no ``status = 0`` guard: a row the crash sweep settled while its instance only seemed
        dead (a long pause) gets its real outcome, which is better than the sweep's guess.
        """
        values = {**vars(outcome), "reserved_tokens": 0, "reserved_cost_usd": 0.0}
        with self._engine.begin() as conn:
            conn.execute(update(ledger_table).where(ledger_table.c.id == row_id).values(**values))

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
