"""The ledger's background work: in-flight streams' progress, this instance's heartbeat, the sweep.

Streams report what they have delivered to an ``InFlight`` book in memory on every chunk (no I/O on
the event loop); every ``ledger.progress_interval`` the keeper writes the rows that changed in one
transaction, refreshes the heartbeat and settles dead instances' rows (``recovery.py``). So a row is
at most one interval behind what its client got, and a gateway that dies loses at most that much
billing.
"""

from __future__ import annotations

import asyncio
import logging

import anyio.to_thread

from ferry.gateway.ledger import Ledger, Progress
from ferry.gateway.recovery import Instances

log = logging.getLogger("ferry.gateway")


class InFlight:
    """Latest progress per pending row id, and which rows changed since the last write.

    NOTE: touched only on the event loop (streams report, the keeper takes), so it needs no lock.
    """

    def __init__(self) -> None:
        self._latest: dict[int, Progress] = {}
        self._changed: set[int] = set()

    def report(self, row_id: int, progress: Progress) -> None:
        self._latest[row_id] = progress
        self._changed.add(row_id)

    def discard(self, row_id: int) -> None:
        """The row is being settled: its progress must not be written any more."""
        self._latest.pop(row_id, None)
        self._changed.discard(row_id)

    def take(self) -> dict[int, Progress]:
        taken = {i: self._latest[i] for i in self._changed}
        self._changed.clear()
        return taken

    def retry(self, taken: dict[int, Progress]) -> None:
        """A write failed: mark those rows changed again, unless settled or reported anew meanwhile."""
        self._changed.update(i for i in taken if i in self._latest)

    def __len__(self) -> int:
        return len(self._latest)


class LedgerKeeper:
    def __init__(self, ledger: Ledger, instances: Instances, inflight: InFlight, interval: float) -> None:
        self._ledger = ledger
        self._instances = instances
        self._inflight = inflight
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # the last round failed: log the outage once, and its end

    async def start(self) -> None:
        """Register (settling what an earlier run of this instance left), sweep once, then tick."""
        await anyio.to_thread.run_sync(self._instances.register)
        await anyio.to_thread.run_sync(self._instances.sweep)
        self._task = asyncio.create_task(self._loop(), name="ferry-gateway-ledger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()
        try:
            await anyio.to_thread.run_sync(self._ledger.write_backlog)
        except Exception:
            # NOTE: the database is still away: the only record left of these settlements is the log.
            self._ledger.log_backlog()
            raise
        await anyio.to_thread.run_sync(self._instances.retire)

    async def flush(self) -> None:
        taken = self._inflight.take()
        if not taken:
            return
        try:
            await anyio.to_thread.run_sync(self._ledger.write_progress, taken)
        except BaseException:
            self._inflight.retry(taken)
            raise

    async def tick(self) -> None:
        """One round; a database back after an outage gets the settlements that waited for it first."""
        written = await anyio.to_thread.run_sync(self._ledger.write_backlog)
        if written:
            log.warning("wrote %d ledger settlements and rows that waited for the database", written)
        await self.flush()
        await anyio.to_thread.run_sync(self._instances.heartbeat)
        await anyio.to_thread.run_sync(self._instances.sweep)
        await anyio.to_thread.run_sync(self._instances.settle_orphans, self._ledger.open_rows.snapshot())
        self._ledger.availability.up()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception as e:
                # NOTE: a database that is briefly away must cost one round, not the loop; the rows
                # that were not written are retried on the next. One line per outage, not per round.
                cause = self._ledger.availability.note(e)
                if cause is None:
                    log.exception("ledger keeper round failed")
                    continue
                if not self._failing:
                    log.warning("ledger database unavailable: %s; retrying every %gs", cause, self._interval)
                self._failing = True
                continue
            if self._failing:
                log.warning("ledger database is back")
                self._failing = False
