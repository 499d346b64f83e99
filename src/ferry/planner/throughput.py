"""A roofline per replica: prefill is compute-bound, decode is memory-bound on weights + KV read per step,
each scaled by an efficiency factor (defaults below, or fitted by ``ferry plan --calibrate``).

One decode step with ``B`` running sequences of mean context ``c`` on a ``tp`` x ``pp`` replica::

    T_mem   = (W + B c kv) / (tp BW eta_mem)          bytes read: all weights once + every KV entry
    T_comp  = B 2 P / (tp F eta_compute)               one token per sequence through P matmul params
    t_step  = overhead + max(T_mem, T_comp) + T_comm   (T_comm: tensor-parallel all-reduces, pp hops)

Prefill of ``N`` prompt tokens: ``overhead + max(W / (tp BW eta_mem), (2 P N + 2 L Hq D N^2) / (tp F eta_prefill))``.
Under continuous batching the prompts of arriving requests ride along in decode steps; in steady state
``B`` new prompts arrive every ``output`` steps, so each step also carries ``B / output`` prompts' compute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ferry.planner.catalog import DtypeSpec, GpuSpec, ModelSpec
from ferry.planner.errors import PlannerError
from ferry.planner.memory import MemoryPlan, weight_bytes

# NOTE: per-collective latency of a small all-reduce; NVLink-class links sit near 10 us, PCIe higher.
# Pipeline stages span nodes, so each stage boundary adds a network hop.
_ALLREDUCE_LATENCY_S = 10e-6
_PCIE_ALLREDUCE_LATENCY_S = 25e-6
_PP_HOP_LATENCY_S = 50e-6


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the engine reaches, and a fixed per-step cost (scheduling, kernel launches)."""

    memory: float = 0.75  # decode: share of peak memory bandwidth
    compute: float = 0.5  # decode: share of peak FLOP/s for batched matmuls
    prefill: float = 0.6  # prefill: share of peak FLOP/s for large matmuls
    step_overhead_s: float = 0.0005

    def __post_init__(self) -> None:
        for name in ("memory", "compute", "prefill"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise PlannerError(f"efficiency {name} must be in (0, 1], got {value!r}")
        if not isinstance(self.step_overhead_s, (int, float)) or not 0 <= self.step_overhead_s < 10:
            raise PlannerError(f"efficiency step_overhead_s must be in [0, 10), got {self.step_overhead_s!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def default_efficiency(gpu: GpuSpec) -> Efficiency:
    """Typical factors: a tuned GPU engine (vLLM-class) or an eager PyTorch CPU engine."""
    if gpu.name == "cpu":
        # NOTE: eager PyTorch on CPU streams weights well below peak and pays Python per step.
        return Efficiency(memory=0.4, compute=0.3, prefill=0.4, step_overhead_s=0.005)
    return Efficiency()


@dataclass(frozen=True)
class Replica:
    """One serving replica: a model at a format on ``tp`` x ``pp`` GPUs."""

    model: ModelSpec
    gpu: GpuSpec
    dtype: DtypeSpec
    kv_dtype: DtypeSpec
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp <= 0 or self.pp <= 0:
            raise PlannerError("tp and pp must be positive")

    @classmethod
    def from_memory(cls, model: ModelSpec, gpu: GpuSpec, dtype: DtypeSpec, kv_dtype: DtypeSpec,
                    mem: MemoryPlan) -> Replica:
        return cls(model, gpu, dtype, kv_dtype, mem.tp, mem.pp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def weight_bytes(self) -> float:
        return weight_bytes(self.model, self.dtype)

    @property
    def bandwidth(self) -> float:
        # NOTE: pipeline stages run one after another for a step, so only tp multiplies bandwidth.
        return self.tp * self.gpu.bandwidth_bytes_s

    @property
    def flops(self) -> float:
        return self.tp * self.gpu.flops(self.dtype.compute)

    def comm_time(self, tokens: int) -> float:
        """Two all-reduces of ``tokens`` hidden vectors per layer across tp, plus pp stage hops."""
        t = 0.0
        if self.tp > 1:
            link = self.gpu.interconnect_gb_s * 1e9
            latency = _PCIE_ALLREDUCE_LATENCY_S if "pcie" in self.gpu.interconnect.lower() else _ALLREDUCE_LATENCY_S
            act_bytes = 4 if self.dtype.compute == "fp32" else 2
            ring = 2 * (self.tp - 1) / self.tp * tokens * self.model.hidden_size * act_bytes
            t += 2 * self.model.num_hidden_layers * (latency + (ring / link if link > 0 else 0.0))
        return t + (self.pp - 1) * _PP_HOP_LATENCY_S


def prefill_flops(model: ModelSpec, tokens: int) -> float:
    """2 FLOPs per matmul parameter per token, plus causal attention (QK^T and PV over half the square)."""
    attn = 2 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * tokens * tokens
    return 2 * model.matmul_params * tokens + attn


def decode_step_time(r: Replica, batch: int, context: float, eff: Efficiency) -> float:
    """Seconds for one decode step of ``batch`` sequences with ``context`` tokens of KV each."""
    if batch <= 0:
        raise PlannerError(f"batch must be positive, got {batch}")
    kv = r.model.kv_bytes_per_token(r.kv_dtype.bytes)
    t_mem = (r.weight_bytes + batch * context * kv) / (r.bandwidth * eff.memory)
    t_comp = batch * 2 * r.model.matmul_params / (r.flops * eff.compute)
    return eff.step_overhead_s + max(t_mem, t_comp) + r.comm_time(batch)


def prefill_compute_time(r: Replica, tokens: int, eff: Efficiency) -> float:
    """The compute of a prompt alone: its marginal cost when it rides along in a decode step."""
    return prefill_flops(r.model, tokens) / (r.flops * eff.prefill)


def prefill_time(r: Replica, tokens: int, eff: Efficiency) -> float:
    """Seconds to prefill one prompt on an idle replica (weights must be read at least once)."""
    t_mem = r.weight_bytes / (r.bandwidth * eff.memory)
    return eff.step_overhead_s + max(t_mem, prefill_compute_time(r, tokens, eff)) + r.comm_time(tokens)


@dataclass(frozen=True)
class ServingPoint:
    """A replica under closed-loop load at ``batch`` concurrent sequences."""

    batch: int
    itl_s: float
    ttft_s: float
    latency_s: float  # one request, first byte to last token
    output_tok_s: float
    requests_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serving_point(r: Replica, batch: int, prompt_tokens: int, output_tokens: int, eff: Efficiency) -> ServingPoint:
    """ITL, TTFT and throughput when ``batch`` requests run at once and each is replaced when it ends.

    ``itl = t_step(B, prompt + output/2) + B/output x prefill_compute(prompt)``;
    ``ttft = prefill(prompt) + (B-1)/B x itl/2`` (a new request waits half a running step on average);
    ``latency = ttft + (output-1) x itl``; ``output tok/s = B x output / latency``.
    """
    if prompt_tokens <= 0 or output_tokens <= 0:
        raise PlannerError("prompt and output tokens must be positive")
    context = prompt_tokens + output_tokens / 2
    itl = decode_step_time(r, batch, context, eff) + batch / output_tokens * prefill_compute_time(r, prompt_tokens, eff)
    ttft = prefill_time(r, prompt_tokens, eff) + (batch - 1) / batch * itl / 2
    latency = ttft + (output_tokens - 1) * itl
    return ServingPoint(batch=batch, itl_s=itl, ttft_s=ttft, latency_s=latency,
                        output_tok_s=batch * output_tokens / latency, requests_s=batch / latency)


def max_batch_for_slo(r: Replica, prompt_tokens: int, output_tokens: int, eff: Efficiency, *,
                      slo_ttft_s: float, slo_itl_s: float, max_batch: int) -> ServingPoint | None:
    """The largest batch (<= ``max_batch``) whose ITL and TTFT meet the SLOs; ``None`` if even 1 misses.

    Both ITL and TTFT grow with the batch, so a binary search finds the edge.
    """
    def ok(b: int) -> bool:
        p = serving_point(r, b, prompt_tokens, output_tokens, eff)
        return p.itl_s <= slo_itl_s and p.ttft_s <= slo_ttft_s

    if max_batch < 1 or not ok(1):
        return None
    lo, hi = 1, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return serving_point(r, lo, prompt_tokens, output_tokens, eff)


def replicas_needed(rps: float, capacity_rps: float) -> int:
    """Replicas to carry ``rps`` when each carries ``capacity_rps``."""
    if capacity_rps <= 0:
        raise PlannerError("replica capacity must be positive")
    return math.ceil(rps / capacity_rps - 1e-9) if rps > 0 else 0
