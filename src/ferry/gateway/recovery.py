"""Settling the ledger rows of a gateway instance that died with requests in flight.

Every instance has a row in ``ferry_gateway_instances`` that it refreshes every
``ledger.progress_interval``. A pending ledger row (status 0) whose instance is dead is settled by
whichever instance notices first: status 500, a reason that starts with "settled after gateway", its
reservation released (``reserved_* = 0``) and its usage left at what the stream had delivered by the
last progress write (``Progress``). An instance is dead when

- it restarts: an instance registering under its own id settles what it left pending (``register``);
- it ran on this host, in this PID namespace, and its process is gone (a restart with a new id
  notices at once; a live process is never taken for dead);
- its heartbeat is older than ``ledger.instance_lease`` (any host; hosts' clocks must agree within it).

Rows whose instance is not registered at all (an older ferry's, or one whose row was swept while it
was only paused) are settled once they are older than the lease. A paused instance that comes back
re-registers on its next heartbeat, and its own ``Ledger.close`` overwrites the sweep's guess.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, insert, select, update

from ferry.gateway.db import instances_table, ledger_table

log = logging.getLogger("ferry.gateway")
SETTLED_STATUS = 500  # NOTE: what the client got is unknown (its connection died with the gateway)
ORPHAN_STATUS = 503  # what the client of an orphaned row got: "database unavailable"


def host_identity() -> str:
    """This host and PID namespace: two processes with the same identity can see each other's PIDs."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"  # NOTE: no /proc (macOS, Windows): PIDs are never compared, only heartbeats
    return f"{socket.gethostname()}|{namespace}"[:255]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclass(frozen=True)
class _Instance:
    id: str
    host: str
    pid: int
    heartbeat_at: float


class Instances:
    """This instance's heartbeat row, and the sweep that settles dead instances' pending rows."""

    def __init__(self, engine: Engine, instance: str, lease: float) -> None:
        self._engine = engine
        self._instance = instance
        self._lease = lease
        self._host = host_identity()
        self._can_see_pids = not self._host.endswith("|?")

    def register(self, now: float | None = None) -> int:
        """Claim this instance's row and settle what an earlier process of the same id left pending;
        returns how many rows that settled."""
        now = time.time() if now is None else now
        with self._engine.begin() as conn:
            conn.execute(delete(instances_table).where(instances_table.c.id == self._instance))
            conn.execute(insert(instances_table).values(id=self._instance, host=self._host, pid=os.getpid(),
                                                        started_at=now, heartbeat_at=now))
            settled = self._settle(conn, self._instance, "settled after gateway restart: instance "
                                                         f"{self._instance!r} restarted with this request in flight")
        if settled:
            log.warning("settled %d ledger rows left in flight by an earlier run of instance %r", settled,
                        self._instance)
        return settled

    def heartbeat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._engine.begin() as conn:
            done = conn.execute(update(instances_table).where(instances_table.c.id == self._instance)
                                .values(heartbeat_at=now)).rowcount
            if not done:  # NOTE: swept while paused (a stopped VM, a long GC): come back
                conn.execute(insert(instances_table).values(id=self._instance, host=self._host, pid=os.getpid(),
                                                            started_at=now, heartbeat_at=now))

    def sweep(self, now: float | None = None) -> int:
        """Settle the pending rows of dead instances (see the module doc); returns how many."""
        now = time.time() if now is None else now
        t = ledger_table.c
        settled = 0
        with self._engine.begin() as conn:
            pending = {r[0] for r in conn.execute(select(t.instance).where(t.status == 0).distinct())}
            pending.discard(self._instance)
            if not pending:
                return 0
            known = {r.id: _Instance(r.id, r.host, r.pid, r.heartbeat_at)
                     for r in conn.execute(select(instances_table))}
            for name in sorted(pending, key=str):
                inst = known.get(name) if name is not None else None
                if inst is None:
                    settled += self._settle(conn, name, f"settled after gateway crash: instance {name!r} is not "
                                                        "registered", older_than=now - self._lease)
                    continue
                reason = self._death(inst, now)
                if reason is None:
                    continue
                settled += self._settle(conn, name, reason)
                # NOTE: only the row as read: an instance that heartbeat meanwhile is alive after all.
                conn.execute(delete(instances_table).where(instances_table.c.id == name,
                                                           instances_table.c.heartbeat_at == inst.heartbeat_at))
        if settled:
            log.warning("settled %d ledger rows left in flight by dead gateway instances", settled)
        return settled

    def settle_orphans(self, open_ids: frozenset[int], now: float | None = None) -> int:
        """Settle this instance's pending rows older than the lease that no request holds any more
        (``ledger.OpenRows``: an admission that committed while its client got a 503); how many."""
        now = time.time() if now is None else now
        t = ledger_table.c
        with self._engine.begin() as conn:
            pending = [r[0] for r in conn.execute(select(t.id).where(
                t.status == 0, t.instance == self._instance, t.ts < now - self._lease))]
            orphans = [i for i in pending if i not in open_ids]
            if not orphans:
                return 0
            # NOTE: ``status = 0`` again: a settlement that committed since the select keeps its outcome.
            settled = int(conn.execute(update(ledger_table).where(t.id.in_(orphans), t.status == 0).values(
                status=ORPHAN_STATUS, reason="settled as an orphan: admitted as the database connection was "
                                             "lost, so the client was answered 503",
                reserved_tokens=0, reserved_cost_usd=0.0)).rowcount)
        if settled:
            log.warning("settled %d orphaned ledger rows of this instance", settled)
        return settled

    def retire(self) -> int:
        """At shutdown: settle this instance's rows still pending and drop its heartbeat row."""
        with self._engine.begin() as conn:
            settled = self._settle(conn, self._instance, "settled at gateway shutdown: instance "
                                                         f"{self._instance!r} stopped with this request in flight")
            conn.execute(delete(instances_table).where(instances_table.c.id == self._instance))
        return settled

    def _death(self, inst: _Instance, now: float) -> str | None:
        """Why ``inst`` is dead, or None while it may be alive."""
        if self._can_see_pids and inst.host == self._host and not pid_alive(inst.pid):
            return f"settled after gateway crash: instance {inst.id!r} (pid {inst.pid}) is gone"
        silent = now - inst.heartbeat_at
        if silent > self._lease:
            return f"settled after gateway crash: instance {inst.id!r} sent no heartbeat for {silent:.0f}s"
        return None

    @staticmethod
    def _settle(conn: Connection, instance: str | None, reason: str, older_than: float | None = None) -> int:
        t = ledger_table.c
        where = [t.status == 0, t.instance.is_(None) if instance is None else t.instance == instance]
        if older_than is not None:
            where.append(t.ts < older_than)
        return int(conn.execute(update(ledger_table).where(*where).values(
            status=SETTLED_STATUS, reason=reason, reserved_tokens=0, reserved_cost_usd=0.0)).rowcount)
