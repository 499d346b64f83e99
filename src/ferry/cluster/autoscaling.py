"""The autoscaling policy on ferry's load signal (``ReplicaStats.load`` via
``record_autoscaling_stats``): running + waiting sequences, a full KV pool counting as full.

desired = ceil(total load / target_load), within min..max; a change must be wanted for
``upscale_delay_s`` (growing) or ``downscale_delay_s`` (shrinking) before it is made.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.serve.config import AutoscalingContext

METRIC = "ferry_load"


def desired_replicas(total_load: float, target_load: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, math.ceil(total_load / target_load) if total_load > 0 else lo))


def ferry_load_policy(ctx: AutoscalingContext, target_load: float = 2.0,
                      upscale_delay_s: float = 5.0,
                      downscale_delay_s: float = 30.0) -> tuple[int, dict[str, Any]]:
    state = dict(ctx.policy_state or {})
    current = ctx.target_num_replicas
    metrics = ctx.aggregated_metrics or {}
    loads = metrics.get(METRIC, {})
    # NOTE: before a replica reports, Ray's own ongoing-request count stands in for its load
    total = sum(loads.values()) if loads else float(ctx.total_num_requests)
    want = desired_replicas(total, target_load, ctx.capacity_adjusted_min_replicas,
                            ctx.capacity_adjusted_max_replicas)
    now = time.time()
    if want == current:
        state.pop("since", None)
        return current, state
    direction = "up" if want > current else "down"
    if state.get("direction") != direction or "since" not in state:
        state.update(direction=direction, since=now)
    delay = upscale_delay_s if direction == "up" else downscale_delay_s
    if now - state["since"] >= delay:
        state.pop("since", None)
        return want, state
    return current, state
