"""PNG charts of a plan (matplotlib, Agg backend, no display needed).

- ``<stem>-cost.png``: monthly cost against the on-prem share of requests, one line per overflow target,
  the pure options as reference lines.
- ``<stem>-load.png``: the 24-hour load, the on-prem capacity of the chosen split as a baseline, the overflow
  shaded above it.
"""

from __future__ import annotations

from pathlib import Path

from ferry.planner.errors import PlannerError
from ferry.planner.options import API, CLOUD, ONPREM, OVERFLOW_TARGETS, RESERVED
from ferry.planner.plan import Plan
from ferry.planner.traffic import HOURS


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
    t = plan.inputs.traffic

    fig, ax = plt.subplots(figsize=(8, 5))
    for target, style in zip(OVERFLOW_TARGETS, ("-o", "-s")):
        pts = sorted((p for p in plan.curve if p.target == target), key=lambda p: p.onprem_share)
        ax.plot([100 * p.onprem_share for p in pts], [p.monthly_usd for p in pts], style, ms=3,
                label=f"on-prem + overflow to {target}")
    for name, color in ((ONPREM, "black"), (CLOUD, "tab:blue"), (RESERVED, "tab:green"), (API, "tab:red")):
        ax.axhline(plan.option(name).monthly_usd, color=color, ls=":", lw=1, label=f"all {name}")
    ax.axvline(100 * plan.chosen.onprem_share, color="gray", ls="--", lw=1,
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
    base = plan.chosen.onprem_replicas * plan.capacity_rps
    onprem = [min(r, base) for r in t.hourly_rps]
    ax.step(hours, t.hourly_rps, where="mid", color="black", label="load (req/s)")
    ax.fill_between(hours, 0, onprem, step="mid", color="tab:green", alpha=0.4,
                    label=f"on-prem ({plan.chosen.onprem_replicas} replicas)")
    ax.fill_between(hours, onprem, t.hourly_rps, step="mid", color="tab:red", alpha=0.4,
                    label=f"overflow to {plan.chosen.target}")
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
