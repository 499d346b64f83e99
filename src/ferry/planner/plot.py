"""PNG charts of a plan (matplotlib, Agg backend, no display needed).

- ``<stem>-cost.png``: monthly cost against the on-prem share of requests, one line per overflow target,
  the pure options as reference lines; splits with too few on-prem replicas for the restricted share
  (``--restricted-share``) are greyed out.
- ``<stem>-load.png``: the 24-hour load, the on-prem capacity of the chosen split as a baseline, the overflow
  shaded above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.planner.errors import PlannerError
from ferry.planner.options import (
    API,
    CLOUD,
    ONPREM,
    OVERFLOW_TARGETS,
    RESERVED,
    HybridPoint,
)
from ferry.planner.plan import Plan, TrafficPlan
from ferry.planner.text import plural
from ferry.planner.traffic import HOURS


@dataclass(frozen=True)
class SplitSeries:
    """One line of the cost plot: the splits overflowing to ``target``, allowed or not by the restricted share."""

    target: str
    allowed: bool
    points: tuple[HybridPoint, ...]  # by on-prem share


def split_series(load: TrafficPlan) -> list[SplitSeries]:
    """Per overflow target, the splits with too few on-prem replicas for the restricted share (greyed out;
    drawn up to the first allowed split so the line stays connected) and the allowed ones."""
    out = []
    for target in OVERFLOW_TARGETS:
        pts = sorted((p for p in load.curve if p.target == target), key=lambda p: p.onprem_share)
        bad = tuple(p for p in pts if p.onprem_replicas < load.k_min)
        ok = tuple(p for p in pts if p.onprem_replicas >= load.k_min)
        if bad:
            out.append(SplitSeries(target, False, bad + ok[:1]))
        if ok:
            out.append(SplitSeries(target, True, ok))
    return out


def plot_paths(path: str | Path) -> tuple[Path, Path]:
    """``plan.png`` -> (``plan-cost.png``, ``plan-load.png``)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() == ".png" else p
    return stem.with_name(stem.name + "-cost.png"), stem.with_name(stem.name + "-load.png")


def write_plots(plan: Plan, path: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # NOTE: before pyplot, so no display or GUI toolkit is needed
    import matplotlib.pyplot as plt

    cost_path, load_path = plot_paths(path)
    if not cost_path.parent.is_dir():
        raise PlannerError(f"--plot: folder {str(cost_path.parent)!r} does not exist")
    load = plan.load
    if load is None:
        raise PlannerError("--plot needs traffic (--rps or --traffic): a memory-only plan has no cost curve")
    t = load.traffic

    fig, ax = plt.subplots(figsize=(8, 5))
    for series in split_series(load):
        style = "-o" if series.target == CLOUD else "-s"
        color = ("tab:purple" if series.target == CLOUD else "tab:orange") if series.allowed else "lightgray"
        label = (f"on-prem + overflow to {series.target}" if series.allowed else
                 f"overflow to {series.target}: breaks the {t.restricted_share:.0%} restricted share")
        ax.plot([100 * p.onprem_share for p in series.points], [p.monthly_usd for p in series.points], style, ms=3,
                color=color, label=label)
    for name, color in ((ONPREM, "black"), (CLOUD, "tab:blue"), (RESERVED, "tab:green"), (API, "tab:red")):
        o = load.option(name)
        ax.axhline(o.monthly_usd, color=color if o.allowed else "lightgray", ls=":", lw=1,
                   label=f"all {name}" + ("" if o.allowed else " (not allowed)"))
    ax.axvline(100 * load.chosen.onprem_share, color="gray", ls="--", lw=1,
               label=f"chosen split (p{plan.inputs.onprem_percentile:g})")
    ax.set_xlabel("requests served on-prem (%)")
    ax.set_ylabel("USD per month")
    ax.set_title(f"{plan.inputs.model.name} on {plan.inputs.gpu.name}: monthly cost vs on-prem share")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(cost_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    hours = list(range(HOURS))
    base = load.chosen.onprem_replicas * load.capacity_rps
    onprem = [min(r, base) for r in t.hourly_rps]
    ax.step(hours, t.hourly_rps, where="mid", color="black", label="load (req/s)")
    ax.fill_between(hours, 0, onprem, step="mid", color="tab:green", alpha=0.4,
                    label=f"on-prem ({plural(load.chosen.onprem_replicas, 'replica')})")
    ax.fill_between(hours, onprem, t.hourly_rps, step="mid", color="tab:red", alpha=0.4,
                    label=f"overflow to {load.chosen.target}")
    ax.axhline(base, color="tab:green", ls="--", lw=1, label="on-prem capacity")
    ax.set_xlabel("hour of day")
    ax.set_ylabel("requests per second")
    ax.set_xticks(range(0, HOURS, 2))
    ax.set_title("24-hour load: on-prem baseline and overflow")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(load_path, dpi=100)
    plt.close(fig)
    return [cost_path, load_path]
