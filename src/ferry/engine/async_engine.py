"""Per-request async streams over an engine loop that runs in its own thread.

    event loop thread                         engine thread
    generate() --AddRequest/AbortRequest-->   inbox -> LLMEngine.step() -> outputs
    asyncio.Queue per request  <--call_soon_threadsafe--  (one RequestOutput per new token batch)

The step loop never runs on the event loop, so /health and /metrics answer while it computes.
A consumer that stops iterating (client disconnect) aborts its request, freeing its blocks.
``shutdown(reason=...)`` fails every open stream at once with ``EngineStoppedError`` (from the
calling thread, so a long step cannot delay it), then stops the loop.

NOTE: ``ferry serve`` runs the step loop on the process's *main* thread (``run_forever``) and the
HTTP event loop on a second thread: PyTorch's OpenMP pool pays ~90 us extra per small matmul when
driven from a non-main thread, which cost ~40% of decode speed on CPU. ``start()`` (a background
thread) remains for embedding the engine in an existing asyncio program.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ferry.batch.request import parent_request_id
from ferry.config import EngineConfig
from ferry.engine.core import EngineStats, StepError
from ferry.engine.llm_engine import LLMEngine, PromptType
from ferry.engine.messages import AbortRequest, AddRequest, EngineMessage, Shutdown
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class EngineError(RuntimeError):
    """The engine failed this request; other requests go on."""


class EngineDeadError(EngineError):
    """The engine thread is not running."""


class EngineStoppedError(EngineDeadError):
    """The engine was shut down on purpose (``shutdown()``: the server is draining), not crashed."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        # NOTE: a closed loop has no consumer left to tell (the HTTP thread is gone).
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._inbox: queue.Queue[EngineMessage] = queue.Queue()
        # NOTE: ``_lock`` orders opening a stream against closing them all, so that no stream can
        # be opened after the sweep that fails every open one (it would wait forever). It is held
        # for a dict operation only, and never taken in a signal handler.
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._closed: tuple[type[EngineDeadError], str] | None = None  # why no stream may open
        self._thread: threading.Thread | None = None  # the thread running the loop
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._stats = engine.stats()
        self.dead_reason: str | None = None  # why the engine thread stopped on its own, if it did

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model (blocking, seconds: call it in a thread). Call ``start()`` next."""
        return cls(LLMEngine(config))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the step loop in a background thread."""
        if self._thread is not None or self._running.is_set():
            return
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="ferry-engine", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """Run the step loop in the calling thread until ``shutdown()`` (from any thread)."""
        if self._running.is_set():
            raise RuntimeError("the engine loop is already running")
        self._running.set()
        self._thread = threading.current_thread()
        self._run()

    def shutdown(self, timeout: float = 10.0, *, reason: str = "the engine shut down") -> None:
        """Stop the loop; waits up to ``timeout`` for it to end (not when called from the loop).

        Every open stream fails at once with ``EngineStoppedError(reason)``, and so does every
        later ``generate``: the streams are failed from the calling thread, not by the engine
        thread, which may be inside a long step. The engine thread then aborts what the core still
        holds and returns. Safe from any thread, but not from a signal handler (it takes locks the
        interrupted thread may hold).
        """
        self._close(EngineStoppedError, reason)
        # NOTE: queued even before the loop runs: ``ferry serve`` may be about to call
        # ``run_forever`` (it loads, checks that HTTP is up, then runs the loop), which must then
        # return at once instead of running with nobody left to stop it.
        self._inbox.put(Shutdown())
        if self._running.is_set() and threading.current_thread() is not self._thread:
            self._stopped.wait(timeout)

    @property
    def is_running(self) -> bool:
        return self._running.is_set() and not self._stopped.is_set()

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._check_open(request_id)
        grammar = None
        if params.structured_outputs is not None:
            # NOTE: a cache miss compiles for up to a second: in a worker thread, so the event loop
            # keeps serving (llguidance drops the GIL), and never on the engine thread.
            grammar = (self.engine.grammars.cached(params.structured_outputs)
                       or await asyncio.to_thread(self.engine.compile_grammar,
                                                  params.structured_outputs))
        state = self.engine.make_request(request_id, prompt, params, grammar)  # ValueError on bad input
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._check_open(request_id)  # again: the engine may have closed meanwhile
            self._streams[request_id] = stream
        self._inbox.put(AddRequest(state))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine dropped it (or is shutting down: it will)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def _check_open(self, request_id: str) -> None:
        if self._closed is not None:
            kind, reason = self._closed
            raise kind(reason)
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")

    def _close(self, kind: type[EngineDeadError], reason: str) -> None:
        """Fail every open stream with ``kind(reason)`` and refuse new ones (any thread; once)."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = (kind, reason)
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(kind(reason))  # one exception per stream: each gets its own traceback

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model's sampling defaults (``--generation-config``), keyed as SamplingParams fields."""
        return self.engine.generation_defaults

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its latest step."""
        return self._stats

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            # NOTE: a bug outside the model step (scheduler, detokenizer...) must not leave every
            # client waiting on a silent thread: fail them all and report the engine dead.
            logger.exception("engine loop crashed")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            self._close(EngineDeadError, f"the engine crashed: {self.dead_reason}")
        finally:
            self._close(EngineStoppedError, "the engine shut down")  # no-op when already closed
            self._stopped.set()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            try:
                message = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            except queue.Empty:
                message = None
            stop = False
            while message is not None:
                stop = stop or self._apply(message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = None
            if stop:
                self._abort_all()
                return
            if engine.has_unfinished():
                self._step()
            self._stats = engine.stats()

    def _apply(self, message: EngineMessage) -> bool:
        if isinstance(message, Shutdown):
            return True
        if isinstance(message, AbortRequest):
            self.engine.abort_request(message.request_id)
            return False
        try:
            self.engine.add(message.state)
        except ValueError as exc:  # e.g. needs more KV blocks than the pool has
            self._fail(message.state.request_id, exc)
        return False

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as exc:
            parents = {parent_request_id(rid) for rid in exc.request_ids}
            for parent in parents:
                self.engine.abort_request(parent)
                self._fail(parent, EngineError(str(exc)))
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(exc)

    def _abort_all(self) -> None:
        """Free what the core holds; ``shutdown()`` has already failed the streams."""
        self.engine.abort_all()
        self._stats = self.engine.stats()
