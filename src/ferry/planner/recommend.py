"""The recommendation, in plain words, and the gateway config fragment that prices on-prem tokens.

Three things decide, in this order:
- data privacy: a restricted share must stay on-prem, so options without on-prem capacity are ruled out;
- cost with predictability: each allowed option scores ``monthly x (1 + weight x variable share)``,
  i.e. a team pays up to ``weight`` more for spend that does not move with traffic;
- traffic variability (peak / mean): a fleet sized to the peak idles off-peak; the hybrid split
  shows what sizing on-prem to a lower percentile and overflowing the rest saves.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ferry.planner.options import (
    HYBRID_API,
    HYBRID_CLOUD,
    ONPREM,
    BreakEven,
    HybridPoint,
    OptionCost,
)
from ferry.planner.text import plural
from ferry.planner.traffic import Traffic


@dataclass(frozen=True)
class Recommendation:
    option: str
    monthly_usd: float
    usd_per_mtok: float
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


def score(option: OptionCost, predictability_weight: float) -> float:
    return option.monthly_usd * (1 + predictability_weight * (1 - option.fixed_share))


def recommend(options: list[OptionCost], traffic: Traffic, *, predictability_weight: float,
              chosen: HybridPoint, chosen_percentile: float, k_peak: int, break_evens: list[BreakEven],
              slo_met: bool) -> Recommendation:
    allowed = [o for o in options if o.allowed]
    best = min(allowed, key=lambda o: (score(o, predictability_weight), -o.fixed_share))
    cheapest = min(allowed, key=lambda o: o.monthly_usd)
    by_name = {o.name: o for o in options}
    reasons = []
    if traffic.restricted_share > 0:
        ruled_out = ", ".join(o.name for o in options if not o.allowed)
        reasons.append(f"Privacy: {traffic.restricted_share:.0%} of requests are restricted and must stay on-prem, "
                       f"so {ruled_out} are ruled out; on-prem must carry at least that share of the peak.")
    else:
        reasons.append("Privacy: no restricted share was given (--restricted-share), so every option is allowed.")
    # NOTE: a hybrid whose best split is all on-prem (or none) is the same plan as a pure option: skip ties.
    runner_up = sorted((o for o in allowed if abs(o.monthly_usd - best.monthly_usd) > 1e-4 * best.monthly_usd),
                       key=lambda o: o.monthly_usd)
    line = f"Cost: {best.name} costs ${best.monthly_usd:,.0f}/month (${best.usd_per_mtok:.3f} per million tokens)"
    if runner_up:
        nxt = runner_up[0]
        line += (f"; the next option, {nxt.name}, costs ${nxt.monthly_usd:,.0f} "
                 f"({_pct_diff(nxt.monthly_usd, best.monthly_usd)}).")
    else:
        line += "."
    reasons.append(line)
    if cheapest.name != best.name:
        reasons.append(f"Predictability: {cheapest.name} is ${best.monthly_usd - cheapest.monthly_usd:,.0f}/month "
                       f"cheaper, but only {cheapest.fixed_share:.0%} of its spend is fixed against "
                       f"{best.fixed_share:.0%} for {best.name}; with --predictability-weight "
                       f"{predictability_weight:g} the steadier bill wins.")
    else:
        reasons.append(f"Predictability: {best.fixed_share:.0%} of {best.name}'s spend is fixed (owned or reserved "
                       f"hardware); the rest moves with traffic.")
    ratio = traffic.peak_rps / traffic.mean_rps
    onprem = by_name[ONPREM]
    util = traffic.mean_rps / traffic.peak_rps
    variability = (f"Variability: peak/mean is {ratio:.1f}; {plural(k_peak, 'on-prem replica')} sized for the "
                   f"peak hour would carry on average {util:.0%} of {'its' if k_peak == 1 else 'their'} peak load")
    hybrids = [by_name[HYBRID_CLOUD], by_name[HYBRID_API]]
    hyb = min(hybrids, key=lambda o: o.monthly_usd)
    if hyb.onprem_replicas < k_peak and hyb.monthly_usd < onprem.monthly_usd:
        variability += (f"; keeping {plural(hyb.onprem_replicas, 'replica')} on-prem and overflowing the rest "
                        f"({hyb.name}) saves ${onprem.monthly_usd - hyb.monthly_usd:,.0f}/month against all on-prem.")
    else:
        variability += "; overflowing the peak elsewhere does not pay at these prices."
    reasons.append(variability)
    reasons.append(f"Your chosen split (on-prem sized to the p{chosen_percentile:g} hour: "
                   f"{plural(chosen.onprem_replicas, 'replica')}, enough for {chosen.covers_percentile:.0f}% of hours; "
                   f"overflow to {chosen.target}) "
                   f"would cost ${chosen.monthly_usd:,.0f}/month and keep {chosen.onprem_share:.0%} of requests "
                   "on-prem.")
    for be in break_evens:
        reasons.append(f"Break-even: {be.note}.")
    if not slo_met:
        reasons.append("Warning: even one request at a time misses the latency SLO on this hardware; the plan "
                       "uses one sequence per replica. A faster GPU, a smaller --dtype or looser SLOs would help.")
    return Recommendation(best.name, best.monthly_usd, best.usd_per_mtok, tuple(reasons))


def _pct_diff(value: float, base: float) -> str:
    if base <= 0:
        return "n/a"
    return f"{(value - base) / base:+.0%}"


_SERVER = {"ferry": "ferry serve", "vLLM": "vllm serve", "SGLang": "SGLang", "llama.cpp": "llama-server"}


def gateway_fragment(model_name: str, *, input_per_mtok: float, output_per_mtok: float, max_concurrency: int,
                     replicas: int, engine: str = "ferry") -> str:
    """YAML for ``ferry gateway``: the on-prem backend with its amortized $/Mtok, and the model routed to it."""
    backend = "onprem-" + re.sub(r"[^A-Za-z0-9_.\-]+", "-", model_name).strip("-")
    return "\n".join([
        f"# ferry gateway: on-prem {model_name} priced at its amortized cost so self-hosted spend is accounted",
        "backends:",
        f"  - name: {backend}",
        f"    url: http://{backend.replace('.', '-')}:8000/v1  # your {_SERVER.get(engine, engine)} replicas "
        f"({replicas}), or a load balancer in front of them",
        "    location: onprem",
        "    kind: ferry  # also for vLLM: the gateway reads its /metrics the same way",
        f"    max_concurrency: {max_concurrency}",
        f"    input_per_mtok: {input_per_mtok:.4f}",
        f"    output_per_mtok: {output_per_mtok:.4f}",
        "models:",
        f"  - name: {model_name}",
        "    deployments:",
        f"      - backend: {backend}",
        f"        model: {model_name}",
        "",
    ])

