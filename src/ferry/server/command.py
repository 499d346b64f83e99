"""`ferry serve`: flags -> ``EngineConfig`` + ``ServerConfig`` -> uvicorn, with a draining shutdown.

Start-up: uvicorn binds at once and ``/health`` answers 503 while the model loads in a thread.
Shutdown on SIGTERM/SIGINT: new requests get 503, running ones may finish for up to
``--shutdown-timeout`` seconds; those still running then end with an in-band error event
(``server_shutting_down``) and ``[DONE]``, the server stops and the process exits 0. A second signal
ends them at once.

Threads: the engine loop owns the main thread, HTTP runs on ``ferry-http``. Python runs signal
handlers on the main thread, in between two bytecodes of the engine loop, so ``handle_exit`` only
hands the signal over to the HTTP event loop; the drain runs there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from concurrent.futures import Future
from types import FrameType

import uvicorn

from ferry.engine.async_engine import AsyncEngine
from ferry.engine.preflight import check as preflight_check
from ferry.logformat import IdleGate, log_every
from ferry.server.app import build_app
from ferry.server.flags import (
    add_arguments,
    configs_from_args,
    parse_bytes,
    uvicorn_options,
)
from ferry.server.logging import configure_logging
from ferry.server.state import ServerState, get_state

logger = logging.getLogger(__name__)

__all__ = ["DrainingServer", "add_arguments", "configs_from_args", "parse_bytes", "run"]


class ServeStats:
    """vLLM's periodic line: prompt and generation throughput over the interval, running and waiting
    sequences, KV cache usage, and the prefix cache's hit rate over the interval."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._last: tuple[float, float, int, int] | None = None  # prompt, generation, prefix queries, hits
        self._idle = IdleGate()

    def _counter(self, name: str) -> float:
        metrics = self.state.metrics
        if metrics is None:
            return 0.0
        value = metrics.registry.get_sample_value(name, {"model_name": metrics.model_name})
        return value or 0.0

    def summary(self, seconds: float) -> str | None:
        engine = self.state.engine
        if engine is None or seconds <= 0:
            return None  # NOTE: still loading: /health says so, and there is nothing to count
        stats = engine.stats()
        now = (self._counter("ferry:prompt_tokens_total"), self._counter("ferry:generation_tokens_total"),
               stats.prefix_cache_queries_total, stats.prefix_cache_hits_total)
        # NOTE: the counters start at zero with the server, so the first interval counts from zero
        last = self._last or (0.0, 0.0, 0, 0)
        self._last = now
        prompt, generation, queries, hits = (a - b for a, b in zip(now, last))
        if not self._idle.passes(not (prompt or generation or stats.num_running or stats.num_waiting)):
            return None
        return (f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
                f"Avg generation throughput: {generation / seconds:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {stats.kv_cache_usage * 100:.1f}%, "
                f"Prefix cache hit rate: {(hits / queries if queries else 0.0) * 100:.1f}%")


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase before its own shutdown, and exit code 1 if the model fails."""

    # NOTE: after the drain, uvicorn still waits this long for open connections to finish sending;
    # it is also what streams ended at the deadline get to send their error event and [DONE].
    GRACE_S = 2.0
    # what a request the server ends gets in its server_shutting_down error
    TIMED_OUT = "The server is shutting down: this request was still running at --shutdown-timeout."
    STOPPED = "The server is shutting down now (a second signal)."

    def __init__(self, config: uvicorn.Config, state: ServerState, stats_interval: float = 0.0) -> None:
        super().__init__(config)
        self.state = state
        self.stats_interval = stats_interval  # seconds between summary lines; 0: none
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        self._watch_task = self._loop.create_task(self._watch_load())
        stats_task = None
        if self.stats_interval > 0:
            stats_task = self._loop.create_task(log_every(
                self.stats_interval, ServeStats(self.state).summary, logging.getLogger("ferry.server.stats")))
        try:
            await super().serve(sockets)
        finally:
            self._watch_task.cancel()
            if stats_task is not None:
                stats_task.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: hand the signal to the HTTP event loop, nothing else.

        NOTE: Python runs this on the main thread, which under ``ferry serve`` is the engine loop,
        in between any two of its bytecodes: maybe while it holds the inbox queue's lock, or in the
        middle of a write to stderr. So it must not log, take a lock, or touch the engine or the
        server's state; ``call_soon_threadsafe`` only appends to a deque and writes one byte to the
        loop's self-pipe. Everything else happens in ``_on_signal``, on the event loop's thread.
        NOTE: the signal is not recorded in uvicorn's ``_captured_signals``: uvicorn would re-raise
        it after serving, and the default SIGTERM action would turn our clean exit into -15.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            self.should_exit = True  # not serving yet (uvicorn then never starts), or not any more
            return
        try:
            loop.call_soon_threadsafe(self._on_signal, sig)
        except RuntimeError:  # NOTE: the loop closed since the check: HTTP is over already
            self.should_exit = True

    def _on_signal(self, sig: int) -> None:
        """A signal, on the event loop: the first one drains, a later one stops at once."""
        name = signal.Signals(sig).name
        if self._drain_task is None and not self.should_exit:
            logger.info("signal %s: draining (no new requests, up to %gs for running ones)",
                        name, self.state.config.shutdown_timeout)
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
            return
        logger.warning("signal %s while stopping: ending running requests now", name)
        self.state.draining = True
        self._end_streams(self.STOPPED)
        self.should_exit = True
        self.force_exit = sig == signal.SIGINT  # a second Ctrl-C does not wait for the sockets

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        admission = self.state.admission
        self.state.draining = True
        deadline = loop.time() + self.state.config.shutdown_timeout
        while admission.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if admission.in_flight:
            logger.warning("shutdown timeout: ending %d sequences still in flight",
                           admission.in_flight)
            self._end_streams(self.TIMED_OUT)
            # NOTE: each ended stream now sends its error event and [DONE] and gives its units
            # back; wait for that (bounded) so that uvicorn's own shutdown finds them finished.
            deadline = loop.time() + self.GRACE_S
            while admission.in_flight > 0 and loop.time() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True

    def _end_streams(self, reason: str) -> None:
        """Fail every open engine stream with ``EngineStoppedError``: the routes turn it into an
        in-band ``server_shutting_down`` error event and [DONE] (a 503 before the status line)."""
        engine = self.state.engine
        if engine is not None:
            # NOTE: timeout=0: never block the event loop. The streams are failed from this thread
            # at once; the engine thread frees their blocks and returns at its next message check.
            engine.shutdown(timeout=0, reason=reason)

    async def _watch_load(self) -> None:
        while not self.should_exit:
            if self.state.load_error is not None:
                logger.error("exiting: the model failed to load")
                self.exit_code = 1
                self.should_exit = True
                return
            await asyncio.sleep(0.1)


def run(args: argparse.Namespace) -> int:
    try:
        engine_config, server_config = configs_from_args(args)
    except ValueError as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, server_config.log_format)
    if args.trust_remote_code:
        logger.info("--trust-remote-code has no effect: ferry never runs code from a model "
                    "repository")
    try:
        # NOTE: before HTTP starts: a model that cannot be found or cannot fit is one line and
        # exit 2, not a server that answers 503 and then dies.
        preflight_check(engine_config)
    except ValueError as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 2
    # NOTE: the engine loop owns the main thread (PyTorch's OpenMP pool runs small matmuls ~3x
    # slower from other threads); HTTP runs on a second thread and gets the engine once loaded,
    # so /health answers 503 meanwhile.
    loaded: Future[AsyncEngine] = Future()
    app = build_app(loaded.result, server_config,
                    max_num_seqs=engine_config.scheduler.max_num_seqs)
    uv_config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                               log_config=None, access_log=False, lifespan="on",
                               timeout_graceful_shutdown=DrainingServer.GRACE_S,
                               **uvicorn_options(server_config))
    server = DrainingServer(uv_config, get_state(app),
                            stats_interval=args.log_stats_interval if args.log_stats else 0.0)

    def serve_http() -> None:
        try:
            asyncio.run(server.serve())
        finally:  # whatever ended HTTP also ends the engine loop on the main thread
            if loaded.done() and loaded.exception() is None:
                loaded.result().shutdown(timeout=0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http = threading.Thread(target=serve_http, name="ferry-http")
    http.start()
    try:
        engine = AsyncEngine.from_config(engine_config)
    except Exception as exc:  # reported by /health and the load watcher, which exits 1
        loaded.set_exception(exc)
    else:
        loaded.set_result(engine)
        if http.is_alive():
            engine.run_forever()
    http.join()
    if not server.started and server.exit_code == 0:
        return 1  # could not bind, or start-up failed; uvicorn logged why
    return server.exit_code
