"""Per-replica engine stats: what each replica reports, and the hub that gathers them.

Each replica pushes a ``ReplicaStats`` to one ``StatsHub`` actor per application every
``PUSH_INTERVAL_S``; the ingress reads the hub for ``/metrics``, ``/health/replicas`` and the
aggregate ``stats()`` its app's series read. NOTE: a hub, not calls to each replica: a
DeploymentHandle routes a call to one replica, it cannot reach them all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import ray

from ferry.engine.core import EngineStats

PUSH_INTERVAL_S = 0.5
STALE_AFTER_S = 5.0  # a replica silent this long is reported down
HUB_NAMESPACE = "serve"
KV_FULL = 0.95  # KV-cache usage from which a replica counts as having a full batch


@dataclass(frozen=True)
class ReplicaStats:
    replica: str  # Ray Serve's replica id
    node: str
    pid: int
    stats: EngineStats
    max_num_seqs: int
    running: bool
    dead_reason: str | None
    at: float  # time.time() of the snapshot

    @property
    def load(self) -> float:
        """ferry's load signal: sequences held, and a full KV pool counts as a full batch.

        NOTE: Ray's own signal (ongoing requests) is blind to a KV pool that is full with few
        long requests: such a replica is as busy as one with a full batch.
        """
        running = float(self.stats.num_running)
        if self.stats.kv_cache_usage >= KV_FULL:
            running = max(running, float(self.max_num_seqs))
        return running + self.stats.num_waiting

    def fresh(self, now: float | None = None) -> bool:
        return ((now or time.time()) - self.at) < STALE_AFTER_S

    def healthy(self, now: float | None = None) -> bool:
        return self.fresh(now) and self.running

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """The replica as ``/health/replicas`` and ``ferry cluster status`` show it."""
        now = now or time.time()
        return {"replica": self.replica, "node": self.node, "pid": self.pid,
                "healthy": self.healthy(now), "dead_reason": self.dead_reason, "load": self.load,
                "num_running": self.stats.num_running, "num_waiting": self.stats.num_waiting,
                "kv_cache_usage": round(self.stats.kv_cache_usage, 4),
                "age_s": round(now - self.at, 3)}


def hub_name(app_name: str) -> str:
    return f"ferry-stats:{app_name}"


@ray.remote(num_cpus=0)
class StatsHub:
    """Latest ``ReplicaStats`` per replica; replicas that stop pushing age out."""

    def __init__(self) -> None:
        self._latest: dict[str, ReplicaStats] = {}

    def push(self, stats: ReplicaStats) -> None:
        self._latest[stats.replica] = stats

    def snapshot(self) -> list[ReplicaStats]:
        now = time.time()
        # NOTE: forget replicas long gone (replaced by Ray), keep recently silent ones (down)
        self._latest = {k: v for k, v in self._latest.items() if now - v.at < 60.0}
        return sorted(self._latest.values(), key=lambda s: s.replica)


def get_hub(app_name: str) -> ray.actor.ActorHandle:
    """The application's hub, created by whoever asks first (detached: it outlives its creator)."""
    return StatsHub.options(name=hub_name(app_name), namespace=HUB_NAMESPACE,  # type: ignore[attr-defined]
                            get_if_exists=True, lifetime="detached").remote()


def aggregate(replicas: list[ReplicaStats]) -> EngineStats | None:
    """One ``EngineStats`` over the live replicas: sums, and KV usage weighted by pool size."""
    live = [r for r in replicas if r.fresh()]
    if not live:
        return None
    total_blocks = sum(r.stats.num_total_blocks for r in live)
    free_blocks = sum(r.stats.num_free_blocks for r in live)
    used = sum(r.stats.kv_cache_usage * r.stats.num_total_blocks for r in live)
    first = live[0].stats
    return replace(first, spec_decode=None,
                   num_running=sum(r.stats.num_running for r in live),
                   num_waiting=sum(r.stats.num_waiting for r in live),
                   kv_cache_usage=used / total_blocks if total_blocks else 0.0,
                   num_free_blocks=free_blocks, num_total_blocks=total_blocks,
                   num_preemptions_total=sum(r.stats.num_preemptions_total for r in replicas),
                   prefix_cache_queries_total=sum(r.stats.prefix_cache_queries_total
                                                  for r in replicas),
                   prefix_cache_hits_total=sum(r.stats.prefix_cache_hits_total for r in replicas))
