"""One Ray Serve replica: one ferry engine, built from ``ferry serve``'s flags as ``ferry serve``
builds it, streaming ``RequestOutput``s for token-id prompts the ingress sends.

NOTE: ``ferry serve`` runs the engine loop on the main thread (PyTorch's OpenMP pool is slower from
other threads); a Ray worker's main thread belongs to Ray, so here the loop runs on a background
thread (``AsyncEngine.start``), with ``torch.set_num_threads`` = the replica's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayError

from ferry.cluster.stats import PUSH_INTERVAL_S, ReplicaStats, get_hub
from ferry.engine.async_engine import AsyncEngine
from ferry.engine.llm_engine import PromptType
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server.flags import configs_from_args
from ferry.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to run ferry's routes without a local engine."""

    model_name: str
    max_model_len: int
    generation_defaults: dict[str, Any]
    tokenizer: Tokenizer
    max_num_seqs: int


class FerryReplica:
    """The deployment class (``serve.deployment`` is applied in ``ferry.cluster.deploy``)."""

    def __init__(self, serve_args: argparse.Namespace, threads: int, app_name: str) -> None:
        import torch  # NOTE: the engine imports it anyway; threads must be set before the load

        torch.set_num_threads(threads)
        engine_config, _ = configs_from_args(serve_args)
        self._max_num_seqs = engine_config.scheduler.max_num_seqs
        self.engine = AsyncEngine.from_config(engine_config)
        self.engine.start()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self._node = os.uname().nodename
        self._hub = get_hub(app_name)
        self._push_task: asyncio.Task[None] | None = None
        logger.info("replica %s ready: %s, %d thread(s)", self.replica_id, self.engine.model_name,
                    threads)

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._ensure_pushing()
        # NOTE: a cancelled call (client gone) closes this generator, and closing the engine's
        # stream aborts the request there, freeing its blocks.
        async for out in self.engine.generate(prompt, params, request_id):
            yield out

    async def info(self) -> ModelInfo:
        self._ensure_pushing()
        e = self.engine
        return ModelInfo(e.model_name, e.max_model_len, dict(e.generation_defaults), e.tokenizer,
                         self._max_num_seqs)

    def snapshot(self) -> ReplicaStats:
        e = self.engine
        return ReplicaStats(replica=self.replica_id, node=self._node, pid=os.getpid(),
                            stats=e.stats(), max_num_seqs=self._max_num_seqs,
                            running=e.is_running, dead_reason=e.dead_reason, at=time.time())

    # -- Ray Serve hooks -----------------------------------------------------------------------
    async def check_health(self) -> None:
        """Ray replaces a replica whose health check raises: an engine thread that died."""
        self._ensure_pushing()  # NOTE: the first health check starts the pushes, before traffic
        if not self.engine.is_running:
            raise RuntimeError(f"ferry engine is not running: {self.engine.dead_reason}")

    def record_routing_stats(self) -> dict[str, Any]:
        """What ``PrefixAwareRouter`` sees of this replica (``RunningReplica.routing_stats``)."""
        s = self.snapshot()
        return {"load": s.load, "kv_cache_usage": s.stats.kv_cache_usage}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """ferry's load signal for the autoscaling policy (``ferry.cluster.autoscaling``)."""
        return {"ferry_load": self.snapshot().load}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0, reason="the replica is shutting down")

    # -- stats to the hub ----------------------------------------------------------------------
    def _ensure_pushing(self) -> None:
        if self._push_task is None:
            self._push_task = asyncio.get_running_loop().create_task(self._push_loop())

    async def _push_loop(self) -> None:
        while True:
            try:
                await self._hub.push.remote(self.snapshot())
            except RayError as exc:  # NOTE: the hub restarting must not stop the replica
                logger.warning("stats push failed: %s", exc)
            await asyncio.sleep(PUSH_INTERVAL_S)
