"""Admission: RPM/TPM per key and USD budgets per key and team, counted in the shared database.

Admission reads the ledger of the last minute and inserts the request's pending row in one
transaction that holds the key's row lock (``SELECT … FOR UPDATE`` on PostgreSQL, every key row of
the team when a team budget applies; ``BEGIN IMMEDIATE`` on SQLite), so gateway instances sharing a
database enforce one limit, not one each.

The pending row carries a reservation (``reservation.py``): the most tokens the request can use and
their cost at the dearest deployment it may use. TPM and budgets count it until ``Ledger.close``
settles the row to the upstream's actual usage. A request is admitted while what its key (and team)
has used or holds is below the limit. Each admitted request is counted by the next admission, and
none uses more than it holds, so a limit is passed by at most the last admitted request's own usage,
never by a burst.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine, func, insert, select

from ferry.gateway.config import GatewayConfig, ModelRoute
from ferry.gateway.db import keys_table, ledger_table
from ferry.gateway.keys import KeyRecord
from ferry.gateway.ledger import LedgerRow, OpenRows, cost_usd, held_cost, held_tokens

WINDOW_S = 60.0
# NOTE: CHARS_PER_TOKEN, DEFAULT_CHAT_COMPLETION_TOKENS and ``estimate`` are a typical-size guess, not a
# bound ("hi" and its chat template cost ~30 tokens, not 1): admission no longer uses them, it
# reserves ``reservation.Reserver``'s upper bound. They stay for callers that want a typical size.
CHARS_PER_TOKEN = 4
DEFAULT_CHAT_COMPLETION_TOKENS = 512
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class Estimate:
    """What a request may use at most, reserved in its pending ledger row until it ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def _chars(value: Any) -> int:
    """Characters of every string in a JSON value (message contents, text parts, names, tool calls)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)  # token ids
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return sum(len(p) for p in prompt)  # lists of token ids
    chars = _chars(body.get("messages")) + _chars(prompt)
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate(body: dict[str, Any], endpoint: str, input_per_mtok: float, output_per_mtok: float) -> Estimate:
    """Prompt tokens from the body's characters, completion tokens from ``max_tokens`` x ``n``."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        limit = DEFAULT_COMPLETION_TOKENS if endpoint == "completions" else DEFAULT_CHAT_COMPLETION_TOKENS
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    prompt, completion = _prompt_tokens(body), limit * n
    return Estimate(prompt, completion, cost_usd(prompt, completion, input_per_mtok, output_per_mtok))


def dearest_prices(config: GatewayConfig, route: ModelRoute, locations: tuple[str, ...]) -> tuple[float, float]:
    """The highest input and output prices among the route's deployments in ``locations``."""
    prices = [(d.input_per_mtok if d.input_per_mtok is not None else b.input_per_mtok,
               d.output_per_mtok if d.output_per_mtok is not None else b.output_per_mtok)
              for d in route.deployments if (b := config.backend(d.backend)).location in locations]
    return max((p[0] for p in prices), default=0.0), max((p[1] for p in prices), default=0.0)


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
    def __init__(self, engine: Engine, instance: str, team_budgets: dict[str, float | None],
                 open_rows: OpenRows | None = None) -> None:
        self._engine = engine
        self._instance = instance
        self._team_budgets = team_budgets
        self._open_rows = open_rows or OpenRows()
        self._postgres = engine.dialect.name == "postgresql"

    def counts_usage(self, key: KeyRecord | None) -> bool:
        """Whether a request of ``key`` is held to a TPM limit or a budget (its reservation matters)."""
        if key is None:
            return False
        team_budget = self._team_budgets.get(key.team) if key.team else None
        return key.tpm is not None or key.budget_usd is not None or team_budget is not None

    def admit(self, key: KeyRecord | None, row: LedgerRow, reserve: Estimate = Estimate(),
              now: float | None = None) -> Admission | Refusal:
        """Check the key's limits and, in the same transaction, insert the request's ledger row
        (``row`` with its status and reason set here), holding ``reserve`` until ``Ledger.close``
        settles it."""
        decision = self._admit(key, row, reserve, now)
        if isinstance(decision, Admission):
            self._open_rows.add(decision.row_id)
        return decision

    def _admit(self, key: KeyRecord | None, row: LedgerRow, reserve: Estimate, now: float | None
               ) -> Admission | Refusal:
        now = time.time() if now is None else now
        base = {"ts": now, "instance": self._instance}
        t = ledger_table.c
        with self._engine.begin() as conn:
            refusal: tuple[str, str, int | None] | None = None
            if key is not None:
                team_budget = self._team_budgets.get(key.team) if key.team else None
                if self._postgres:
                    # NOTE: with a team budget, two keys of the team check one sum: lock every key row
                    # of the team (in id order, so two admissions cannot deadlock), not just this one.
                    who = keys_table.c.team == key.team if team_budget is not None else keys_table.c.id == key.id
                    conn.execute(select(keys_table.c.id).where(who).order_by(keys_table.c.id).with_for_update())
                window = conn.execute(
                    select(t.ts, held_tokens())
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
                                          f"and has used or reserved {sum(int(n) for _, n in window)}", retry)
                if refusal is None and key.budget_usd is not None:
                    spent = conn.execute(select(func.coalesce(func.sum(held_cost()), 0.0))
                                         .where(t.key_id == key.id)).scalar_one()
                    if spent >= key.budget_usd:
                        refusal = ("budget_key", f"budget exceeded: key {key.name!r} has spent or reserved "
                                                 f"${spent:.6f} of its ${key.budget_usd:g} budget", None)
                if refusal is None and team_budget is not None:
                    spent = conn.execute(select(func.coalesce(func.sum(held_cost()), 0.0))
                                         .where(t.team == key.team)).scalar_one()
                    if spent >= team_budget:
                        refusal = ("budget_team", f"budget exceeded: team {key.team!r} has spent or reserved "
                                                  f"${spent:.6f} of its ${team_budget:g} budget", None)
            if refusal is not None:
                reason, message, retry = refusal
                refused = replace(row, status=429, reason=f"{reason}: {message}")
                row_id = conn.execute(insert(ledger_table).values(
                    **base, **refused.columns(), admitted=False)).inserted_primary_key[0]
                return Refusal(reason, message, retry, int(row_id))
            pending = replace(row, status=0, reason=None)
            row_id = conn.execute(insert(ledger_table).values(
                **base, **pending.columns(), admitted=True,
                reserved_tokens=reserve.prompt_tokens + reserve.completion_tokens,
                reserved_cost_usd=reserve.cost_usd)).inserted_primary_key[0]
            return Admission(int(row_id))
