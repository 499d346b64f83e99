"""The autoscaling policy on ferry's load signal (``ReplicaStats.load`` via
``record_autoscaling_stats``): running + waiting sequences, a full KV pool counting as a full batch.

    total   = max(sum of the replicas' ferry load, Ray's ongoing requests)
    desired = ceil(total / target_load)

Ray Serve wraps the policy: it bounds ``desired`` to min..max replicas and applies the
``autoscaling_config``'s ``upscale_delay_s`` / ``downscale_delay_s`` (a change is made once it has
been wanted that long without a break). NOTE: Ray's ongoing-request count stays in the max: it
also sees requests queued in the ingress's handle, which no replica reports yet.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.serve.config import AutoscalingContext

METRIC = "ferry_load"

logger = logging.getLogger("ray.serve")  # NOTE: runs in Serve's controller: its log


def desired_replicas(total_load: float, target_load: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, math.ceil(total_load / target_load) if total_load > 0 else lo))


class FerryLoadPolicy:
    """Ray Serve's custom policy (a class, so that ``policy_kwargs`` reach it: Ray passes them
    to a class's constructor and ignores them for a plain function)."""

    def __init__(self, target_load: float = 2.0) -> None:
        self.target_load = float(target_load)

    def total_load(self, ctx: AutoscalingContext) -> float:
        loads = (ctx.aggregated_metrics or {}).get(METRIC, {})
        return max(float(sum(loads.values())), float(ctx.total_num_requests or 0.0))

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        total = self.total_load(ctx)
        want = desired_replicas(total, self.target_load, ctx.capacity_adjusted_min_replicas,
                                ctx.capacity_adjusted_max_replicas)
        state = dict(ctx.policy_state or {})
        if want != ctx.target_num_replicas and state.get("ferry_wants") != want:
            logger.info("ferry autoscaling: load %.2f (target %.1f per replica) wants %d "
                        "replica(s), %d now", total, self.target_load, want,
                        ctx.target_num_replicas)
        state["ferry_wants"] = want
        return want, state
