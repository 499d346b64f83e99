"""Admission: RPM/TPM per key and USD budgets per key and team, counted in the shared database.

Admission reads the ledger of the last minute and inserts the request's pending row in one
transaction that holds the key's row lock (``SELECT … FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE``
on SQLite), so gateway instances sharing a database enforce one limit, not one each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select

from ferry.gateway.db import keys_table, ledger_table
from ferry.gateway.keys import KeyRecord

WINDOW_S = 60.0


@dataclass(frozen=True)
class Refusal:
    reason: str  # rpm | tpm | budget_key | budget_team
    message: str
    retry_after: int | None  # seconds, for rate limits; None for budgets
    row_id: int


@dataclass(frozen=True)
class Admission:
    row_id: int


class Limits:
    def __init__(self, engine: Engine, instance: str, team_budgets: dict[str, float | None]) -> None:
        self._engine = engine
        self._instance = instance
        self._team_budgets = team_budgets
        self._postgres = engine.dialect.name == "postgresql"

    def admit(self, key: KeyRecord | None, row: dict[str, Any], now: float | None = None) -> Admission | Refusal:
        """Check the key's limits and, in the same transaction, insert the request's ledger row."""
        now = time.time() if now is None else now
        base = {"ts": now, "instance": self._instance, **row}
        t = ledger_table.c
        with self._engine.begin() as conn:
            refusal: tuple[str, str, int | None] | None = None
            if key is not None:
                if self._postgres:
                    conn.execute(select(keys_table.c.id).where(keys_table.c.id == key.id).with_for_update())
                window = conn.execute(
                    select(t.ts, t.prompt_tokens + t.completion_tokens)
                    .where(t.key_id == key.id, t.admitted.is_(True), t.ts > now - WINDOW_S)
                    .order_by(t.ts)).all()
                if key.rpm is not None and len(window) >= key.rpm:
                    oldest = window[len(window) - key.rpm][0]
                    refusal = ("rpm", f"rate limit: key {key.name!r} allows {key.rpm} requests per minute",
                               max(1, math.ceil(oldest + WINDOW_S - now)))
                if refusal is None and key.tpm is not None:
                    used = sum(int(n) for _, n in window)
                    if used >= key.tpm:
                        retry = 1
                        for ts, n in window:  # the time until enough tokens leave the window
                            used -= int(n)
                            if used < key.tpm:
                                retry = max(1, math.ceil(ts + WINDOW_S - now))
                                break
                        refusal = ("tpm", f"rate limit: key {key.name!r} allows {key.tpm} tokens per minute "
                                          f"and has used {sum(int(n) for _, n in window)}", retry)
                if refusal is None and key.budget_usd is not None:
                    spent = conn.execute(select(func.coalesce(func.sum(t.cost_usd), 0.0))
                                         .where(t.key_id == key.id)).scalar_one()
                    if spent >= key.budget_usd:
                        refusal = ("budget_key", f"budget exceeded: key {key.name!r} has spent ${spent:.6f} of its "
                                                 f"${key.budget_usd:g} budget", None)
                team_budget = self._team_budgets.get(key.team) if key.team else None
                if refusal is None and team_budget is not None:
                    spent = conn.execute(select(func.coalesce(func.sum(t.cost_usd), 0.0))
                                         .where(t.team == key.team)).scalar_one()
                    if spent >= team_budget:
                        refusal = ("budget_team", f"budget exceeded: team {key.team!r} has spent ${spent:.6f} of "
                                                  f"its ${team_budget:g} budget", None)
            if refusal is not None:
                reason, message, retry = refusal
                row_id = conn.execute(insert(ledger_table).values(
                    **base, admitted=False, status=429, reason=f"{reason}: {message}")).inserted_primary_key[0]
                return Refusal(reason, message, retry, int(row_id))
            row_id = conn.execute(insert(ledger_table).values(**base, admitted=True, status=0)
                                  ).inserted_primary_key[0]
            return Admission(int(row_id))
