"""``PrefixAwareRouter``: send a prompt to the replica that already holds its prefix's KV blocks.

The router hashes the prompt's token ids in whole blocks (chained, as the engine's prefix cache
does) and remembers which replica it last sent each block hash to (an LRU of ``max_entries``).
A request goes to the replica with the longest remembered prefix unless that replica's load is
more than ``imbalance`` above the least-loaded candidate's; then, and for prompts nobody holds,
the least-loaded replica wins (ties: the one holding the most blocks, then Ray's order).

Load = requests this router has in flight on the replica (exact for requests it routed), or the
replica's own ``record_routing_stats`` load when that is larger (other routers, a full KV pool).
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

BLOCK_TOKENS = 16
MAX_BLOCKS = 256  # prompts are hashed up to this many blocks


def prefix_hashes(token_ids: list[int], block_tokens: int = BLOCK_TOKENS) -> list[bytes]:
    """One chained hash per whole block of ``token_ids``."""
    out: list[bytes] = []
    parent = b""
    for start in range(0, min(len(token_ids), MAX_BLOCKS * block_tokens) - block_tokens + 1,
                       block_tokens):
        block = token_ids[start:start + block_tokens]
        h = hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in block),
                            digest_size=16).digest()
        out.append(h)
        parent = h
    return out


def _prompt_of(request: PendingRequest | None) -> list[int] | None:
    if request is None or not request.args:
        return None
    prompt = request.args[0]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt[:4]):
        return prompt
    return None


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, imbalance: float = 4.0, max_entries: int = 200_000,
                         **kwargs: Any) -> None:
        self._imbalance = float(imbalance)
        self._max_entries = int(max_entries)
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self._inflight: dict[ReplicaID, int] = {}
        self._request_replica: dict[str, ReplicaID] = {}

    def _load(self, replica: RunningReplica) -> float:
        reported = float((replica.routing_stats or {}).get("load", 0.0))
        return max(float(self._inflight.get(replica.replica_id, 0)), reported)

    def _matched_blocks(self, hashes: list[bytes]) -> dict[ReplicaID, int]:
        """Per replica, how many leading blocks of the prompt it was last sent."""
        matched: dict[ReplicaID, int] = {}
        for depth, h in enumerate(hashes, start=1):
            owner = self._owner.get(h)
            if owner is None:
                break
            matched[owner] = depth
        return matched

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        prompt = _prompt_of(pending_request)
        matched = self._matched_blocks(prefix_hashes(prompt)) if prompt else {}
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        least = min(loads.values())
        # NOTE: shuffled first, so that ties (requests routed at once, before any of them is
        # counted in flight) spread instead of all taking the first candidate
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        ranked = sorted(shuffled,
                        key=lambda r: (loads[r.replica_id], -matched.get(r.replica_id, 0)))
        holders = [r for r in candidate_replicas if matched.get(r.replica_id, 0) > 0
                   and loads[r.replica_id] <= least + self._imbalance]
        if holders:
            best = max(holders, key=lambda r: (matched[r.replica_id], -loads[r.replica_id]))
            return [[best], [r for r in ranked if r is not best]]
        return [[ranked[0]], ranked[1:]] if len(ranked) > 1 else [ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self._inflight[replica_id] = self._inflight.get(replica_id, 0) + 1
        self._request_replica[pending_request.metadata.internal_request_id] = replica_id
        prompt = _prompt_of(pending_request)
        if prompt is None:
            return
        for h in prefix_hashes(prompt):
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self._max_entries:
            self._owner.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._request_replica.pop(internal_request_id, None)
        if routed is not None and self._inflight.get(routed, 0) > 0:
            self._inflight[routed] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._inflight.pop(replica_id, None)
        for h in [h for h, owner in self._owner.items() if owner == replica_id]:
            del self._owner[h]
