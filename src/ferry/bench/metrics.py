"""From per-request results to one load point's numbers: throughput, latency percentiles, goodput."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ferry.bench.client import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, linearly interpolated between closest ranks (numpy's default)."""
    # NOTE: checked here so that the messages name our arguments (numpy's would not, or return nan).
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return float(np.percentile(values, q))


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        ms = [v * 1000.0 for v in values]
        return cls(count=len(ms), mean=sum(ms) / len(ms), p50=percentile(ms, 50), p90=percentile(ms, 90),
                   p99=percentile(ms, 99))

    def to_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput; a request is good when it meets every one that is set."""

    ttft_ms: float | None = None
    itl_ms: float | None = None  # checked against the request's mean inter-token latency (its TPOT)

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.itl_ms is not None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1000.0 > self.ttft_ms):
            return False
        # NOTE: a one-token answer has no inter-token latency, so it cannot break the ITL objective.
        tpot = r.tpot
        return self.itl_ms is None or tpot is None or tpot * 1000.0 <= self.itl_ms

    def to_dict(self) -> dict[str, float | None]:
        return {"ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms}


@dataclass(frozen=True)
class LoadPointMetrics:
    num_requests: int
    ok: int
    failed: int
    errors: dict[str, int]  # error_kind -> count
    error_examples: dict[str, str]  # error_kind -> the first message seen
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float  # successful requests / s
    output_throughput: float  # output tokens / s
    total_throughput: float  # (prompt + output) tokens / s
    token_sources: dict[str, int]  # "usage" | "tokenizer" | "chunks" -> requests counted that way
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    e2e: Stats | None
    slo: SLO
    good_requests: int | None  # None when no SLO is set
    goodput: float | None  # good requests / s

    def to_dict(self) -> dict[str, Any]:
        def stats(s: Stats | None) -> dict[str, float] | None:
            return s.to_dict() if s is not None else None

        return {
            "num_requests": self.num_requests, "ok": self.ok, "failed": self.failed,
            "errors": dict(self.errors), "error_examples": dict(self.error_examples),
            "duration_s": self.duration_s, "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens, "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput, "total_throughput": self.total_throughput,
            "token_sources": dict(self.token_sources),
            "ttft_ms": stats(self.ttft), "tpot_ms": stats(self.tpot), "itl_ms": stats(self.itl),
            "e2e_ms": stats(self.e2e), "slo": self.slo.to_dict(), "good_requests": self.good_requests,
            "goodput": self.goodput,
        }


def compute_metrics(results: Sequence[RequestResult], duration_s: float, slo: SLO = SLO()) -> LoadPointMetrics:
    """Aggregates one load point; throughputs divide by ``duration_s`` (first send to last finish)."""
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    good = [r for r in results if r.ok]
    errors = Counter(r.error_kind or "unknown" for r in results if not r.ok)
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            examples.setdefault(r.error_kind or "unknown", r.error or "")
    prompt_tokens = sum(r.prompt_tokens or 0 for r in good)
    output_tokens = sum(r.output_tokens for r in good)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    good_count = sum(1 for r in results if slo.met_by(r)) if slo.is_set else None
    return LoadPointMetrics(
        num_requests=len(results), ok=len(good), failed=len(results) - len(good),
        errors=dict(sorted(errors.items())), error_examples=examples, duration_s=duration_s,
        total_prompt_tokens=prompt_tokens, total_output_tokens=output_tokens,
        request_throughput=per_s(len(good)), output_throughput=per_s(output_tokens),
        total_throughput=per_s(prompt_tokens + output_tokens),
        token_sources=dict(sorted(Counter(r.token_source for r in good if r.token_source).items())),
        ttft=Stats.of_seconds([r.ttft for r in good if r.ttft is not None]),
        tpot=Stats.of_seconds([t for r in good if (t := r.tpot) is not None]),
        itl=Stats.of_seconds([g for r in good for g in r.itls]),
        e2e=Stats.of_seconds([r.e2e for r in good if r.e2e is not None]),
        slo=slo, good_requests=good_count,
        goodput=per_s(good_count) if good_count is not None else None,
    )
