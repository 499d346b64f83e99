"""ferry's autoscaling policy on hand-made stats: the load signal (a full KV pool is a full batch),
the replica count it wants, and Ray's up/down delays around it (no Ray instance needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from ferry.cluster.autoscaling import METRIC, FerryLoadPolicy, desired_replicas
from ferry.cluster.stats import ReplicaStats
from ferry.engine.core import EngineStats

DEP = DeploymentID(name="FerryReplica", app_name="t")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def at(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def _stats(running: int, waiting: int, kv: float, max_num_seqs: int = 4) -> ReplicaStats:
    total = 16
    engine = EngineStats(running, waiting, kv, round(total * (1 - kv)), total, 0, 0, 0)
    return ReplicaStats(replica="r", node="n", pid=1, stats=engine, max_num_seqs=max_num_seqs,
                        running=True, dead_reason=None, at=0.0)


def _ctx(loads: list[float], ongoing: float, current: int, now: float,
         state: dict | None = None, lo: int = 1, hi: int = 2,
         config: AutoscalingConfig | None = None) -> AutoscalingContext:
    ids = [ReplicaID(f"r{i}", DEP) for i in range(len(loads))]
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name="t", current_num_replicas=current,
        target_num_replicas=current, running_replicas=ids, total_num_requests=ongoing,
        total_queued_requests=0.0, aggregated_metrics={METRIC: dict(zip(ids, loads))},
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=config)


def test_load_counts_a_full_kv_pool_as_a_full_batch() -> None:
    assert _stats(1, 0, 0.40).load == 1.0
    assert _stats(1, 0, 0.97).load == 4.0  # one long request holding every block: busy
    assert _stats(2, 3, 1.00).load == 7.0  # a full batch and what queues behind it
    assert _stats(4, 2, 0.50).load == 6.0
    assert _stats(6, 0, 1.00, max_num_seqs=4).load == 6.0


def test_desired_replicas_is_bounded() -> None:
    assert desired_replicas(0.0, 2.0, 1, 3) == 1
    assert desired_replicas(2.0, 2.0, 1, 3) == 1
    assert desired_replicas(2.5, 2.0, 1, 3) == 2
    assert desired_replicas(50.0, 2.0, 1, 3) == 3
    assert desired_replicas(0.0, 2.0, 0, 3) == 0


def test_a_replica_with_a_full_kv_pool_scales_out_where_ongoing_requests_would_not() -> None:
    policy = FerryLoadPolicy(target_load=3.0)
    full = _stats(1, 0, 1.0).load  # 1 ongoing request, but every block in use
    # Ray's default signal: 1 ongoing request against a target of 3 -> one replica is enough
    assert desired_replicas(1.0, 3.0, 1, 2) == 1
    assert policy(_ctx([full], ongoing=1.0, current=1, now=0.0))[0] == 2
    # the same request with blocks to spare: one replica
    assert policy(_ctx([_stats(1, 0, 0.3).load], ongoing=1.0, current=1, now=0.0))[0] == 1
    # two busy replicas with a KV pool each full: stays at max
    assert policy(_ctx([full, full], ongoing=2.0, current=2, now=0.0))[0] == 2


def test_requests_queued_before_any_replica_reports_count() -> None:
    policy = FerryLoadPolicy(target_load=2.0)
    assert policy(_ctx([], ongoing=5.0, current=1, now=0.0))[0] == 2
    assert policy(_ctx([], ongoing=0.0, current=2, now=0.0))[0] == 1


def test_ray_applies_the_delays_and_keeps_the_policys_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: Ray Serve wraps every custom policy with its bounds and delays (a private helper: this
    # pins the behaviour docs/scale-out.md describes); its delays read time.time(): a fake clock
    from ray.serve import autoscaling_policy
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    clock = FakeClock()
    monkeypatch.setattr(autoscaling_policy, "time", clock)

    config = AutoscalingConfig(min_replicas=1, max_replicas=2, upscale_delay_s=2.0,
                               downscale_delay_s=5.0)
    wrapped = _apply_autoscaling_config(FerryLoadPolicy(target_load=2.0))
    state: dict = {}

    def tick(now: float, loads: list[float], ongoing: float, current: int) -> int:
        nonlocal state
        clock.at(now)
        n, state = wrapped(_ctx(loads, ongoing, current, now, state=state, config=config))
        return n

    busy = [_stats(1, 0, 1.0).load]
    assert tick(100.0, busy, 1.0, current=1) == 1 and state["ferry_wants"] == 2
    assert tick(101.0, busy, 1.0, current=1) == 1
    assert tick(102.5, busy, 1.0, current=1) == 2  # wanted for the 2 s upscale delay
    idle = [0.0, 0.0]
    assert tick(110.0, idle, 0.0, current=2) == 2
    # load comes back before the downscale delay: the countdown restarts
    assert tick(113.0, [3.0, 2.0], 5.0, current=2) == 2
    assert tick(114.0, idle, 0.0, current=2) == 2
    assert tick(117.0, idle, 0.0, current=2) == 2  # 8 s after the first idle tick: not yet
    assert tick(119.5, idle, 0.0, current=2) == 1
