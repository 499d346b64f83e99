"""``--plot``: output throughput and p99 TTFT against load, one line per server, in one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ferry.bench.runner import PointResult


def plot_points(points: Sequence[PointResult], path: str | Path) -> Path:
    """Draws two panels side by side; load points are evenly spaced categories (so ``inf`` fits)."""
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display on servers; Agg writes files only
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("nothing to plot: no load point finished")
    loads = []
    for p in points:
        if p.load.label not in loads:
            loads.append(p.load.label)
    servers: dict[str, dict[str, PointResult]] = {}
    for p in points:
        servers.setdefault(p.target.label, {})[p.load.label] = p

    fig, (ax_thr, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    positive_ttft = False
    for label, by_load in servers.items():
        xs = [i for i, load in enumerate(loads) if load in by_load]
        thr = [by_load[loads[i]].metrics.output_throughput for i in xs]
        ttft = [by_load[loads[i]].metrics.ttft.p99 if by_load[loads[i]].metrics.ttft else float("nan") for i in xs]
        ax_thr.plot(xs, thr, marker="o", label=label)
        ax_ttft.plot(xs, ttft, marker="o", label=label)
        positive_ttft = positive_ttft or any(v > 0 for v in ttft)  # NaN > 0 is False
    mode = points[0].load.mode
    for ax, title, ylabel in ((ax_thr, "Output throughput", "tokens / s"), (ax_ttft, "TTFT p99", "ms")):
        ax.set_xticks(range(len(loads)))
        ax.set_xticklabels(loads)
        ax.set_xlabel("concurrency" if mode == "concurrency" else "request rate")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_thr.set_ylim(bottom=0)
    if positive_ttft:
        ax_ttft.set_yscale("log")  # NOTE: a queueing server's TTFT spans orders of magnitude across loads
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out
