"""The traffic to plan for: 24 hourly request rates, tokens per request, and the restricted share.

Given only a mean and a peak rate, the day follows a smooth curve peaking at 14:00::

    rps(h) = mean x w(h),   w(h) = exp(k cos(2 pi (h - 14) / 24)) / mean_h exp(k cos(...))

with ``k >= 0`` chosen by bisection so that ``max rps = peak`` (``k = 0``: flat). Rates stay positive and
the mean is exact. A traffic file may give the 24 hourly rates directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ferry.planner.errors import PlannerError

HOURS = 24
PEAK_HOUR = 14
_TRAFFIC_KEYS = ("hourly_rps", "rps", "peak_rps", "prompt_tokens", "output_tokens", "restricted_share")


@dataclass(frozen=True)
class Traffic:
    hourly_rps: tuple[float, ...]  # requests/s in each hour of the day, 0..23
    prompt_tokens: int
    output_tokens: int
    restricted_share: float = 0.0  # share of requests that must stay on-prem (data privacy)

    def __post_init__(self) -> None:
        if len(self.hourly_rps) != HOURS:
            raise PlannerError(f"hourly_rps must have {HOURS} values, got {len(self.hourly_rps)}")
        for h, r in enumerate(self.hourly_rps):
            if not _is_number(r) or r < 0:
                raise PlannerError(f"hourly_rps[{h}] must be a non-negative number, got {r!r}")
        if not any(r > 0 for r in self.hourly_rps):
            raise PlannerError("traffic must have a positive rate in at least one hour")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlannerError(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.restricted_share) or not 0 <= self.restricted_share <= 1:
            raise PlannerError(f"restricted_share must be in [0, 1], got {self.restricted_share!r}")

    @property
    def mean_rps(self) -> float:
        return sum(self.hourly_rps) / HOURS

    @property
    def peak_rps(self) -> float:
        return max(self.hourly_rps)

    @property
    def tokens_per_request(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def percentile_rps(self, p: float) -> float:
        """The ``p``-th percentile of the hourly rates (linear interpolation, p in [0, 100])."""
        if not 0 <= p <= 100:
            raise PlannerError(f"percentile must be in [0, 100], got {p}")
        xs = sorted(self.hourly_rps)
        pos = p / 100 * (HOURS - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, HOURS - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def share_at_or_below(self, rps: float) -> float:
        """Share of hours whose rate is at most ``rps``: the percentile an on-prem capacity covers."""
        return sum(1 for r in self.hourly_rps if r <= rps + 1e-12) / HOURS

    def monthly_requests(self, hours_per_month: float) -> float:
        return self.mean_rps * 3600 * hours_per_month

    def scaled(self, factor: float) -> Traffic:
        return Traffic(tuple(r * factor for r in self.hourly_rps), self.prompt_tokens, self.output_tokens,
                       self.restricted_share)


def diurnal_profile(mean_rps: float, peak_rps: float) -> tuple[float, ...]:
    """24 hourly rates with the given mean and peak (see the module docstring)."""
    if not _is_number(mean_rps) or mean_rps <= 0:
        raise PlannerError(f"--rps must be a positive number, got {mean_rps!r}")
    if not _is_number(peak_rps) or peak_rps < mean_rps:
        raise PlannerError(f"--peak-rps must be a number >= --rps ({mean_rps}), got {peak_rps!r}")
    ratio = peak_rps / mean_rps
    if ratio >= HOURS:
        raise PlannerError(f"peak/mean must be below {HOURS} for a 24-hour profile, got {ratio:.1f}")

    def shape(k: float) -> list[float]:
        # NOTE: subtract k before exp so large k cannot overflow; the normalisation cancels it.
        w = [math.exp(k * (math.cos(2 * math.pi * (h - PEAK_HOUR) / HOURS) - 1)) for h in range(HOURS)]
        m = sum(w) / HOURS
        return [x / m for x in w]

    lo, hi = 0.0, 1.0
    while max(shape(hi)) < ratio:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if max(shape(mid)) < ratio:
            lo = mid
        else:
            hi = mid
    return tuple(mean_rps * x for x in shape((lo + hi) / 2))


def make_traffic(*, rps: float | None, peak_rps: float | None, prompt_tokens: int, output_tokens: int,
                 restricted_share: float = 0.0) -> Traffic:
    if rps is None:
        raise PlannerError("give --rps (and optionally --peak-rps) or a --traffic file")
    return Traffic(diurnal_profile(rps, rps if peak_rps is None else peak_rps), prompt_tokens, output_tokens,
                   restricted_share)


def load_traffic(path: str | Path, *, restricted_share: float | None = None) -> Traffic:
    """Read a traffic YAML: ``hourly_rps`` (24 values) or ``rps`` [+ ``peak_rps``], tokens, restricted share.

    A ``restricted_share`` given on the command line overrides the file's.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise PlannerError(f"cannot read traffic file {str(path)!r}: {e}") from e
    except yaml.YAMLError as e:
        raise PlannerError(f"traffic file {str(path)!r} is not valid YAML: {e}") from e
    return parse_traffic(data, source=str(path), restricted_share=restricted_share)


def parse_traffic(data: Any, *, source: str = "traffic", restricted_share: float | None = None) -> Traffic:
    if not isinstance(data, dict):
        raise PlannerError(f"{source}: must be a mapping with keys {list(_TRAFFIC_KEYS)}")
    unknown = sorted(set(data) - set(_TRAFFIC_KEYS))
    if unknown:
        raise PlannerError(f"{source}: unknown keys {unknown}, expected some of {list(_TRAFFIC_KEYS)}")
    for key in ("prompt_tokens", "output_tokens"):
        if key not in data:
            raise PlannerError(f"{source}: {key} is required")
    share = data.get("restricted_share", 0.0) if restricted_share is None else restricted_share
    try:
        if "hourly_rps" in data:
            if "rps" in data or "peak_rps" in data:
                raise PlannerError(f"{source}: give either hourly_rps or rps/peak_rps, not both")
            hourly = data["hourly_rps"]
            if not isinstance(hourly, list):
                raise PlannerError(f"{source}: hourly_rps must be a list of {HOURS} numbers")
            return Traffic(tuple(hourly), data["prompt_tokens"], data["output_tokens"], share)
        return make_traffic(rps=data.get("rps"), peak_rps=data.get("peak_rps"), prompt_tokens=data["prompt_tokens"],
                            output_tokens=data["output_tokens"], restricted_share=share)
    except PlannerError as e:
        raise PlannerError(f"{source}: {e}") from e


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
