"""Ratios of one server's output throughput over its peers', measured in the same run, and goals on them.

A goal reads "ferry's output tok/s at this load is at least ``minimum`` x the peer's"; it is met, not
met, or not measured (the peer was skipped, or the load point was not in the run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ferry.bench.runner import PointResult


@dataclass(frozen=True)
class Goal:
    peer: str
    load: str  # a load label, e.g. "c=32"
    minimum: float  # ferry / peer output tok/s must be >= this

    def __post_init__(self) -> None:
        if not self.minimum > 0:
            raise ValueError(f"a goal's minimum ratio must be positive, got {self.minimum}")


@dataclass(frozen=True)
class Verdict:
    goal: Goal
    ratio: float | None  # None: not measured
    reason: str | None = None  # why not measured

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= self.goal.minimum

    def line(self, base: str) -> str:
        g = self.goal
        head = f"output tok/s {base}/{g.peer} at {g.load}"
        if self.ratio is None:
            return f"{head}: not measured ({self.reason}) (goal >= {g.minimum:g}x)"
        return f"{head}: {self.ratio:.2f}x (goal >= {g.minimum:g}x: {'met' if self.met else 'NOT met'})"

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.goal.peer, "load": self.goal.load, "minimum": self.goal.minimum,
                "ratio": self.ratio, "met": self.met, "reason": self.reason}


def _throughputs(points: Sequence[PointResult]) -> dict[tuple[str, str], float]:
    """(label, load label) -> output tok/s, for points where at least one request succeeded."""
    return {(p.target.label, p.load.label): p.metrics.output_throughput for p in points if p.metrics.ok}


def judge(points: Sequence[PointResult], base: str, goals: Sequence[Goal],
          skipped: dict[str, str] | None = None) -> list[Verdict]:
    """Each goal's verdict; ``skipped``: peer -> why it did not run."""
    skipped = skipped or {}
    thr = _throughputs(points)
    out = []
    for g in goals:
        if g.peer in skipped:
            out.append(Verdict(g, None, f"peer skipped: {skipped[g.peer]}"))
        elif (g.peer, g.load) not in thr:
            out.append(Verdict(g, None, f"{g.peer} has no {g.load} point in this run"))
        elif (base, g.load) not in thr:
            out.append(Verdict(g, None, f"{base} has no {g.load} point in this run"))
        elif thr[(g.peer, g.load)] <= 0:
            out.append(Verdict(g, None, f"{g.peer} produced no tokens at {g.load}"))
        else:
            out.append(Verdict(g, thr[(base, g.load)] / thr[(g.peer, g.load)]))
    return out


def ratio_table(points: Sequence[PointResult], base: str, others: Sequence[str]) -> str:
    """A markdown table: per load, each server's output tok/s, base/other, and TTFT p99 (ms)."""
    by = {(p.target.label, p.load.label): p.metrics for p in points}
    loads = list(dict.fromkeys(p.load.label for p in points))
    labels = [base, *others]
    header = ["load", *(f"{lab} out tok/s" for lab in labels), *(f"{base}/{o}" for o in others),
              *(f"{lab} TTFT p99 ms" for lab in labels)]
    rows = []
    for load in loads:
        thr = {lab: by[(lab, load)].output_throughput if (lab, load) in by else None for lab in labels}
        ttft = {lab: (by[(lab, load)].ttft.p99 if (lab, load) in by and by[(lab, load)].ttft else None)
                for lab in labels}
        row = [load, *(f"{thr[lab]:,.1f}" if thr[lab] is not None else "-" for lab in labels)]
        row += [f"{thr[base] / thr[o]:.2f}x" if thr[o] and thr[base] else "-" for o in others]
        row += [f"{ttft[lab]:,.0f}" if ttft[lab] is not None else "-" for lab in labels]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), " | ".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)
