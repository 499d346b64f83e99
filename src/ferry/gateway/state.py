"""Everything one gateway app owns, built from a config and an environment; no module globals."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
import httpx

from ferry.gateway.backends import Backend, make_backend
from ferry.gateway.config import GatewayConfig
from ferry.gateway.data_class import DataClassPolicy
from ferry.gateway.db import Availability, make_engine, redact
from ferry.gateway.health import BackendStates, HealthMonitor, PreferKnownUp
from ferry.gateway.keeper import InFlight, LedgerKeeper
from ferry.gateway.keys import KeyStore
from ferry.gateway.ledger import Ledger, OpenRows
from ferry.gateway.limits import Limits
from ferry.gateway.metrics import GatewayMetrics, GatewayStats
from ferry.gateway.recovery import Instances
from ferry.gateway.reservation import Reserver
from ferry.gateway.routing import Router, make_policy
from ferry.logformat import log_every
from ferry.openai_errors import OpenAIError

T = TypeVar("T")
log = logging.getLogger("ferry.gateway")


class Gateway:
    def __init__(self, config: GatewayConfig, env: Mapping[str, str], instance: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        missing = config.missing_env(env)
        if missing:
            raise ValueError("; ".join(missing))
        self.config = config
        self.instance = instance or secrets.token_hex(4)
        self.master_key: str = env[config.master_key_env]
        self.engine = make_engine(config.database)  # NOTE: raises db.DatabaseError, one line, when unusable
        self.database = Availability()
        self.database_name = redact(config.database)
        open_rows = OpenRows()  # admitted rows not settled yet, shared by admission and the ledger
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(self.engine, self.instance, open_rows, self.database)
        self.limits = Limits(self.engine, self.instance, {t.name: t.budget_usd for t in config.teams}, open_rows)
        self.data_classes = DataClassPolicy(config)
        self.backends: dict[str, Backend] = {b.name: make_backend(b, config.health, env, transport)
                                             for b in config.backends}
        self.states = BackendStates()  # unknown until a backend first answers (health.py)
        self.router = Router(config, self.backends, PreferKnownUp(make_policy(config.routing.policy), self.states))
        self.reserver = Reserver(config, self.backends)
        self.inflight = InFlight()  # streams' delivered tokens, written to their rows by the keeper
        self.keeper = LedgerKeeper(self.ledger, Instances(self.engine, self.instance, config.ledger.instance_lease),
                                   self.inflight, config.ledger.progress_interval)
        self.metrics = GatewayMetrics(self.backends, self.states.state)
        self.monitor = HealthMonitor(list(self.backends.values()), config.health, config.routing.metrics_interval,
                                     self.router.notify, self.states)
        # seconds between the summary lines in the log (`ferry gateway --log-stats-interval`); 0: none
        self.log_stats_interval = 0.0
        self._stats_task: asyncio.Task[None] | None = None

    def is_master(self, secret: str | None) -> bool:
        """Whether ``secret`` is the master key, compared in constant time."""
        # NOTE: ``!=`` stops at the first differing byte, so response times would leak the key's
        # prefix; bytes, since compare_digest refuses non-ASCII str.
        return secret is not None and hmac.compare_digest(secret.encode(), self.master_key.encode())

    async def start(self) -> None:
        # NOTE: before serving: rows an earlier run of this instance left in flight are settled, and
        # the heartbeat that keeps other instances off this one's rows is running.
        await self.keeper.start()
        # NOTE: one scrape before serving, so the first requests already see the replicas' load.
        await self.monitor.scrape_once()
        self.monitor.start()
        if self.log_stats_interval > 0:
            stats = GatewayStats(self.metrics, self.backends, self.states.state)
            self._stats_task = asyncio.create_task(
                log_every(self.log_stats_interval, stats.summary, logging.getLogger("ferry.gateway.stats")),
                name="ferry-gateway-stats")

    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        await self.monitor.stop()
        try:
            await self.keeper.stop()
        except Exception:
            # NOTE: a database gone at shutdown must not keep the backends open; the rows this left
            # pending are settled by the next start of this instance or by a live peer.
            log.exception("could not settle this instance's in-flight ledger rows at shutdown")
        await asyncio.gather(*(b.aclose() for b in self.backends.values()))
        self.engine.dispose()

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking database call off the event loop; an unreachable database is a 503 in
        OpenAI's shape that names the cause ("ledger database unavailable: connection refused")."""
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except Exception as e:
            cause = self.database.note(e)
            if cause is None:
                raise
            # NOTE: nothing was held yet where this is raised (authentication, admission, the admin
            # API): settlements never raise it, they wait in the ledger's backlog instead.
            raise OpenAIError(503, f"ledger database unavailable: {cause}", code="database_unavailable",
                              headers={"Retry-After": "1"}) from e
