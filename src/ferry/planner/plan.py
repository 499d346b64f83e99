"""One plan: memory -> replica layout and the engines that run it; with traffic, also SLO batch and capacity
-> replicas -> cost options -> recommendation -> deployment.

``make_plan(PlanInputs(...))`` is pure arithmetic over the catalogues: no I/O, no randomness.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ferry.planner.catalog import DtypeSpec, GpuSpec, ModelSpec
from ferry.planner.engines import LayoutAdvice, advise
from ferry.planner.errors import PlannerError
from ferry.planner.memory import MemoryPlan, plan_memory
from ferry.planner.options import (
    API,
    CLOUD,
    HYBRID_API,
    HYBRID_CLOUD,
    ONPREM,
    OVERFLOW_TARGETS,
    RESERVED,
    BreakEven,
    Fleet,
    HybridPoint,
    OptionCost,
    best_hybrid,
    break_even,
    hybrid_curve,
    hybrid_point,
    min_onprem_replicas,
    monthly_tokens,
    price_options,
)
from ferry.planner.pricing import CostAssumptions, onprem_monthly
from ferry.planner.recommend import Recommendation, gateway_fragment, recommend
from ferry.planner.throughput import (
    Efficiency,
    Replica,
    ServingPoint,
    decode_step_time,
    max_batch_for_slo,
    prefill_compute_time,
    serving_point,
)
from ferry.planner.traffic import Traffic


@dataclass(frozen=True)
class PlanInputs:
    model: ModelSpec
    gpu: GpuSpec
    dtype: DtypeSpec
    kv_dtype: DtypeSpec
    context: int
    traffic: Traffic | None  # None: a memory-only plan
    costs: CostAssumptions
    efficiency: Efficiency
    efficiency_source: str = "default factors"
    slo_ttft_s: float = 2.0
    slo_itl_s: float = 0.1
    onprem_percentile: float = 50.0  # the user's hybrid: on-prem sized to this percentile of hourly load
    predictability_weight: float = 0.1
    memory_utilization: float = 0.9
    kv_cache_memory: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    concurrency: int | None = None  # also predict closed-loop load at this many concurrent requests

    def __post_init__(self) -> None:
        for name in ("slo_ttft_s", "slo_itl_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PlannerError(f"{name.replace('_s', '').replace('_', '-')} must be a positive number, "
                                   f"got {value!r}")
        if not 0 <= self.onprem_percentile <= 100:
            raise PlannerError(f"--onprem-percentile must be in [0, 100], got {self.onprem_percentile}")
        if not math.isfinite(self.predictability_weight) or self.predictability_weight < 0:
            raise PlannerError(f"--predictability-weight must be >= 0, got {self.predictability_weight}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise PlannerError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise PlannerError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")
        if self.concurrency is not None and self.concurrency <= 0:
            raise PlannerError(f"--concurrency must be positive, got {self.concurrency}")
        need = self.traffic.prompt_tokens + self.traffic.output_tokens if self.traffic else 0
        if need > self.context:
            raise PlannerError(f"prompt + output tokens ({need}) exceed --context {self.context}")


@dataclass(frozen=True)
class Deployment:
    """What the plan deploys, for emitters (Ray Serve / ``ferry cluster``, Helm values, gateway YAML).

    The self-hosted fleet of the recommended option runs ``replicas_max`` replicas of ``gpus_per_replica``
    GPUs at most; ``hourly_replicas`` is what each hour of the traffic profile needs of it (the autoscaling
    bounds are its min and max). Requests beyond ``replicas x max_concurrency_per_replica`` overflow to
    ``overflow_target``; ``data_classes`` keep the restricted share on-prem.
    """

    engine: str  # the engine that runs ``layout`` (ferry when it can)
    serve_command: str
    model: str
    gpu: str
    gpus_per_replica: int
    gpu_memory_gib: float  # per GPU
    memory_flag: str  # the engine's memory flag with its value
    max_model_len: int
    location: str  # where the self-hosted fleet runs: onprem | cloud | none (API only)
    replicas_min: int
    replicas_max: int
    hourly_replicas: tuple[int, ...]
    max_concurrency_per_replica: int  # the largest batch that meets the SLOs
    input_per_mtok: float  # what the gateway charges for the fleet's tokens
    output_per_mtok: float
    overflow_target: str | None  # "cloud on-demand", "API", or None
    overflow_inflight_fraction: float  # gateway routing.overflow.inflight_fraction
    data_classes: dict[str, tuple[str, ...]]  # name -> allowed locations
    default_data_class: str
    restricted_share: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hourly_replicas"] = list(self.hourly_replicas)
        d["data_classes"] = {k: list(v) for k, v in self.data_classes.items()}
        return d


@dataclass(frozen=True)
class TrafficPlan:
    """Everything that needs traffic: throughput, replicas, costs, the recommendation and the deployment."""

    traffic: Traffic
    max_batch: int  # sequences of prompt + output tokens one replica's KV pool holds (capped by max_num_seqs)
    slo_met: bool
    serving: ServingPoint  # at the largest batch that meets the SLOs
    replicas_mean: int
    replicas_peak: int
    options: list[OptionCost]
    curve: list[HybridPoint]
    chosen: HybridPoint
    break_evens: list[BreakEven]
    recommendation: Recommendation
    onprem_input_per_mtok: float
    onprem_output_per_mtok: float
    gateway_config: str
    prediction: ServingPoint | None
    deployment: Deployment
    k_min: int  # on-prem replicas the restricted share needs at the peak hour

    @property
    def capacity_rps(self) -> float:
        return self.serving.requests_s

    def option(self, name: str) -> OptionCost:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)


@dataclass(frozen=True)
class Plan:
    """The memory plan and who can run it, always; throughput, cost and deployment when traffic is given."""

    inputs: PlanInputs
    memory: MemoryPlan
    layout: LayoutAdvice
    load: TrafficPlan | None  # None: a memory-only plan (no --rps or --traffic)

    @property
    def gpus_per_replica(self) -> int:
        return self.memory.gpus

    def to_dict(self) -> dict[str, Any]:
        i = self.inputs
        d: dict[str, Any] = {
            "model": {"name": i.model.name, "architecture": i.model.architecture, "source": i.model.source,
                      "total_params": i.model.total_params, "active_params": i.model.active_params,
                      "is_moe": i.model.is_moe, "max_context": i.model.max_position_embeddings},
            "gpu": {"name": i.gpu.name, "description": i.gpu.description, "memory_gib": i.gpu.memory_gib,
                    "bandwidth_gb_s": i.gpu.bandwidth_gb_s, "sources": i.gpu.sources},
            "dtype": i.dtype.name, "kv_dtype": i.kv_dtype.name, "context": i.context,
            "memory": self.memory.to_dict(),
            "engines": self.layout.to_dict(),
        }
        s = self.load
        if s is None:
            return d
        t = s.traffic
        tin, tout = monthly_tokens(t, i.costs)
        d.update({
            "traffic": {"hourly_rps": list(t.hourly_rps), "mean_rps": t.mean_rps, "peak_rps": t.peak_rps,
                        "prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens,
                        "restricted_share": t.restricted_share, "monthly_input_tokens": tin,
                        "monthly_output_tokens": tout},
            "slo": {"ttft_ms": i.slo_ttft_s * 1000, "itl_ms": i.slo_itl_s * 1000, "met": s.slo_met},
            "efficiency": {**i.efficiency.to_dict(), "source": i.efficiency_source},
            "throughput": {"max_batch": s.max_batch, "slo_batch": s.serving.batch,
                           "serving": s.serving.to_dict(), "replica_capacity_rps": s.capacity_rps,
                           "replicas_mean": s.replicas_mean, "replicas_peak": s.replicas_peak,
                           "gpus_per_replica": self.gpus_per_replica},
            "prediction": s.prediction.to_dict() if s.prediction else None,
            "costs": {"assumptions": i.costs.to_dict(), "gpu_prices": {
                k: getattr(i.costs.gpu(i.gpu), k) for k in ("on_demand_usd_per_hour", "reserved_usd_per_hour",
                                                             "purchase_usd", "power_w")}},
            "options": [o.to_dict() for o in s.options],
            "hybrid": {"chosen_percentile": i.onprem_percentile, "chosen": s.chosen.to_dict(),
                       "min_onprem_replicas": s.k_min, "curve": [p.to_dict() for p in s.curve]},
            "break_even": [b.to_dict() for b in s.break_evens],
            "recommendation": s.recommendation.to_dict(),
            "gateway": {"onprem_input_per_mtok": s.onprem_input_per_mtok,
                        "onprem_output_per_mtok": s.onprem_output_per_mtok, "config": s.gateway_config},
            "deployment": s.deployment.to_dict(),
        })
        return d


def make_plan(inputs: PlanInputs) -> Plan:
    i = inputs
    mem = plan_memory(i.model, i.gpu, i.dtype, i.kv_dtype, i.context, memory_utilization=i.memory_utilization,
                      kv_cache_memory=i.kv_cache_memory, block_size=i.block_size,
                      max_num_batched_tokens=i.max_num_batched_tokens, max_num_seqs=i.max_num_seqs)
    layout = advise(i.model, i.gpu, i.dtype, i.kv_dtype, mem, memory_utilization=i.memory_utilization,
                    block_size=i.block_size, max_num_batched_tokens=i.max_num_batched_tokens,
                    max_num_seqs=i.max_num_seqs)
    load = _traffic_plan(i, i.traffic, mem, layout) if i.traffic is not None else None
    return Plan(inputs=i, memory=mem, layout=layout, load=load)


def _traffic_plan(i: PlanInputs, t: Traffic, mem: MemoryPlan, layout: LayoutAdvice) -> TrafficPlan:
    replica = Replica.from_memory(i.model, i.gpu, i.dtype, i.kv_dtype, mem)
    max_batch = min(i.max_num_seqs, mem.seqs_of(t.prompt_tokens + t.output_tokens))
    slo_point = max_batch_for_slo(replica, t.prompt_tokens, t.output_tokens, i.efficiency,
                                  slo_ttft_s=i.slo_ttft_s, slo_itl_s=i.slo_itl_s, max_batch=max_batch)
    serving = slo_point or serving_point(replica, 1, t.prompt_tokens, t.output_tokens, i.efficiency)
    fleet = Fleet(capacity_rps=serving.requests_s, gpus_per_replica=mem.gpus, gpu=i.costs.gpu(i.gpu), costs=i.costs)
    api = i.costs.api_price
    curve = hybrid_curve(t, fleet, api)
    options = price_options(t, fleet, api, curve)
    k_min = min_onprem_replicas(t, fleet)
    k_peak = fleet.replicas_for(t.peak_rps)
    k_chosen = max(k_min, fleet.replicas_for(t.percentile_rps(i.onprem_percentile)))
    chosen = min((hybrid_point(k_chosen, target, t, fleet, api) for target in OVERFLOW_TARGETS),
                 key=lambda p: p.monthly_usd)
    break_evens = [break_even(t, fleet, api, ONPREM, API), break_even(t, fleet, api, CLOUD, API),
                   break_even(t, fleet, api, ONPREM, CLOUD)]
    rec = recommend(options, t, predictability_weight=i.predictability_weight, chosen=chosen,
                    chosen_percentile=i.onprem_percentile, k_peak=k_peak,
                    break_evens=break_evens, slo_met=slo_point is not None)
    in_price, out_price, onprem_k = _onprem_token_prices(replica, i.efficiency, serving, t, fleet, curve,
                                                      rec.option, k_min)
    engine = layout.planned.engine
    fragment = gateway_fragment(i.model.name, input_per_mtok=in_price, output_per_mtok=out_price,
                                max_concurrency=max(1, onprem_k) * serving.batch, replicas=max(1, onprem_k),
                                engine=engine)
    prediction = (serving_point(replica, i.concurrency, t.prompt_tokens, t.output_tokens, i.efficiency)
                  if i.concurrency else None)
    by_name = {o.name: o for o in options}
    deployment = _deployment(i, t, fleet, layout, by_name[rec.option], serving.batch, in_price, out_price, k_peak)
    return TrafficPlan(traffic=t, max_batch=max_batch, slo_met=slo_point is not None, serving=serving,
                       replicas_mean=fleet.replicas_for(t.mean_rps), replicas_peak=k_peak, options=options,
                       curve=curve, chosen=chosen, break_evens=break_evens, recommendation=rec,
                       onprem_input_per_mtok=in_price, onprem_output_per_mtok=out_price, gateway_config=fragment,
                       prediction=prediction, deployment=deployment, k_min=k_min)


def _deployment(i: PlanInputs, t: Traffic, fleet: Fleet, layout: LayoutAdvice, option: OptionCost, batch: int,
                in_price: float, out_price: float, k_peak: int) -> Deployment:
    """The recommended option as a fleet: how many replicas where, and where the rest of the traffic goes."""
    # NOTE: hybrids keep their on-prem replicas and overflow the rest; the pure options self-host the whole
    # peak (on-prem or on rented GPUs) or none of it (API).
    replicas, location, overflow = {
        ONPREM: (k_peak, "onprem", None), CLOUD: (k_peak, "cloud", None), RESERVED: (k_peak, "cloud", None),
        API: (0, "none", API), HYBRID_CLOUD: (option.onprem_replicas, "onprem", CLOUD),
        HYBRID_API: (option.onprem_replicas, "onprem", API),
    }[option.name]
    hourly = tuple(min(replicas, fleet.replicas_for(r)) for r in t.hourly_rps)
    classes: dict[str, tuple[str, ...]] = {"public": ("onprem", "cloud")}
    if t.restricted_share > 0:
        classes["restricted"] = ("onprem",)
    p = layout.planned
    return Deployment(engine=p.engine, serve_command=p.command, model=i.model.name, gpu=i.gpu.name,
                      gpus_per_replica=fleet.gpus_per_replica, gpu_memory_gib=i.gpu.memory_gib,
                      memory_flag=p.memory_flag, max_model_len=i.context, location=location,
                      replicas_min=min(hourly), replicas_max=replicas, hourly_replicas=hourly,
                      max_concurrency_per_replica=batch, input_per_mtok=in_price, output_per_mtok=out_price,
                      overflow_target=overflow, overflow_inflight_fraction=1.0, data_classes=classes,
                      default_data_class="public", restricted_share=t.restricted_share)


def _onprem_token_prices(replica: Replica, eff: Efficiency, serving: ServingPoint, traffic: Traffic, fleet: Fleet,
                         curve: list[HybridPoint], recommended: str, k_min: int) -> tuple[float, float, int]:
    """On-prem $/Mtok (input, output) so that the gateway's ledger adds up to the on-prem fleet's monthly cost.

    The fleet is the recommended option's on-prem part (all on-prem when the recommendation has none).
    A request's cost splits between its prompt and its output by replica time: the prompt's prefill
    compute against ``output`` decode-step shares of ``t_step(B) / B``.
    """
    target = {HYBRID_CLOUD: CLOUD, HYBRID_API: API}.get(recommended)
    k = best_hybrid(curve, k_min, target).onprem_replicas if target else 0
    if k == 0:
        k = fleet.replicas_for(traffic.peak_rps)
    point = next(p for p in curve if p.onprem_replicas == k)
    cost = onprem_monthly(k * fleet.gpus_per_replica, fleet.gpu, fleet.costs, point.onprem_utilization).total
    requests = traffic.monthly_requests(fleet.costs.hours_per_month) * point.onprem_share
    t_in = prefill_compute_time(replica, traffic.prompt_tokens, eff)
    context = traffic.prompt_tokens + traffic.output_tokens / 2
    t_out = traffic.output_tokens * decode_step_time(replica, serving.batch, context, eff) / serving.batch
    per_request = cost / requests
    share_in = t_in / (t_in + t_out)
    return (per_request * share_in / traffic.prompt_tokens * 1e6,
            per_request * (1 - share_in) / traffic.output_tokens * 1e6, k)

