"""``RemoteEngine``: what ferry's routes need from an ``AsyncEngine``, served by replicas.

The ingress's app is ferry's own (``ferry.server.app.build_app``); its engine is this object, so
routes, errors, streaming, admission, metrics and the API key are the server's. ``generate``
sends the token-id prompt to the replica deployment (the router picks the replica) and streams
back the replica's ``RequestOutput``s.

Failures: a replica that dies before its first output is retried once on another replica (the
client saw nothing); after that the request fails with ``ReplicaFailedError``, an
``EngineDeadError``, which ferry's routes turn into a 503 (``engine_dead``), in-band once streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ferry.cluster.replica import ModelInfo
from ferry.cluster.stats import ReplicaStats, aggregate
from ferry.engine.async_engine import EngineDeadError, EngineStoppedError
from ferry.engine.core import EngineStats
from ferry.engine.llm_engine import PromptType
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
RETRIES_BEFORE_FIRST_OUTPUT = 1


class ReplicaFailedError(EngineDeadError):
    """The replica serving this request died or could not be reached."""


class RemoteEngine:
    def __init__(self, handle: DeploymentHandle, hub: ray.actor.ActorHandle, info: ModelInfo) -> None:
        self._handle = handle
        self._hub = hub
        self.tokenizer: Tokenizer = info.tokenizer
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.generation_defaults: dict[str, Any] = info.generation_defaults
        self.replica_max_num_seqs = info.max_num_seqs
        self.replicas: list[ReplicaStats] = []
        self._stats: EngineStats | None = None
        self._inflight: dict[str, DeploymentResponseGenerator] = {}
        self._closed: str | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._started = time.time()
        self.after_poll: Callable[[], None] | None = None  # the ingress adds its collector here

    @classmethod
    def connect(cls, handle: DeploymentHandle, hub: ray.actor.ActorHandle,
                timeout_s: float = 600.0) -> RemoteEngine:
        """Blocking (call it in a thread): ask one replica what it serves."""
        info = handle.info.remote().result(timeout_s=timeout_s)
        return cls(handle, hub, info)

    # -- what the routes read ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        self._ensure_polling()
        if self._stats is None:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        return self._stats

    @property
    def is_running(self) -> bool:
        """True while at least one replica reports a running engine (or before the first poll)."""
        self._ensure_polling()
        if self._closed is not None:
            return False
        if not self.replicas:
            return time.time() - self._started < 10.0
        return any(r.fresh() and r.running for r in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        if self._closed is not None:
            return self._closed
        if not self.replicas:
            return "no replica has reported yet"
        reasons = {r.replica: r.dead_reason or "no report for a while" for r in self.replicas}
        return "no replica is running: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._ensure_polling()
        if self._closed is not None:
            raise EngineStoppedError(self._closed)
        attempt = 0
        while True:
            gen = self._handle.options(stream=True).generate.remote(prompt, params, request_id)
            self._inflight[request_id] = gen
            sent = done = False
            try:
                async for out in gen:
                    sent = True
                    yield out
                done = True
                return
            except RayTaskError as exc:
                # NOTE: the replica raised: the engine's own error (ValueError -> 400, ...)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise cause from None
            except (RayActorError, BackPressureError, ray.exceptions.RayError) as exc:
                if not sent and attempt < RETRIES_BEFORE_FIRST_OUTPUT:
                    attempt += 1
                    logger.warning("request %s: replica failed before its first output (%s); "
                                   "retrying on another replica", request_id, type(exc).__name__)
                    continue
                raise ReplicaFailedError(f"the replica serving this request failed: "
                                         f"{type(exc).__name__}") from exc
            finally:
                if self._inflight.get(request_id) is gen:
                    del self._inflight[request_id]
                if not done:
                    gen.cancel()  # NOTE: the replica's generator closes: its engine aborts

    async def abort(self, request_id: str) -> None:
        gen = self._inflight.pop(request_id, None)
        if gen is not None:
            gen.cancel()

    def shutdown(self, timeout: float = 10.0, *, reason: str = "the engine shut down") -> None:
        """Fail new requests and cancel running ones (the replicas themselves stay up)."""
        self._closed = reason
        for gen in list(self._inflight.values()):
            gen.cancel()
        if self._poll_task is not None:
            self._poll_task.cancel()

    # -- the replicas' stats ---------------------------------------------------------------
    def _ensure_polling(self) -> None:
        # NOTE: started from the first call on the event loop: ``connect`` runs in a thread.
        if self._poll_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._poll_task = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                self.replicas = await self._hub.snapshot.remote()
                self._stats = aggregate(self.replicas) or self._stats
                if self.after_poll is not None:
                    self.after_poll()
            except ray.exceptions.RayError as exc:
                logger.warning("reading replica stats failed: %s", exc)
            await asyncio.sleep(POLL_INTERVAL_S)
