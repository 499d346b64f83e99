"""Percentiles, latency stats, goodput and counts on hand-made request results."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.bench.client import RequestResult
from ferry.bench.metrics import SLO, Stats, compute_metrics, percentile


@pytest.mark.parametrize("values", [[5.0], [1.0, 2.0], [3.0, 1.0, 2.0], [float(x) for x in range(1, 101)],
                                    [0.12, 0.5, 0.03, 7.0, 2.2, 2.2, 0.9]])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_known_values() -> None:
    xs = [float(x) for x in range(1, 11)]  # 1..10
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_stats_in_milliseconds() -> None:
    s = Stats.of_seconds([0.010, 0.020, 0.030, 0.040])
    assert s is not None
    assert s.count == 4
    assert s.mean == pytest.approx(25.0)
    assert s.p50 == pytest.approx(25.0)
    assert s.p99 == pytest.approx(39.7)
    assert Stats.of_seconds([]) is None


def _ok(ttft: float, itls: tuple[float, ...], out: int, prompt: int = 10) -> RequestResult:
    return RequestResult(ok=True, start=0.0, e2e=ttft + sum(itls), ttft=ttft, itls=itls, output_tokens=out,
                         prompt_tokens=prompt, token_source="usage", finish_reason="length")


def _failed(kind: str, msg: str) -> RequestResult:
    return RequestResult(ok=False, start=0.0, e2e=0.01, error_kind=kind, error=msg)


def test_compute_metrics_counts_and_throughput() -> None:
    results = [
        _ok(0.1, (0.01, 0.01, 0.01), out=4),
        _ok(0.3, (0.02, 0.02, 0.02), out=4),
        _failed("http_500", "HTTP 500: boom"),
        _failed("connect_error", "refused"),
        _failed("http_500", "HTTP 500: again"),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m.num_requests, m.ok, m.failed) == (5, 2, 3)
    assert m.ok + m.failed == m.num_requests == sum(m.errors.values()) + m.ok
    assert m.errors == {"connect_error": 1, "http_500": 2}
    assert m.error_examples["http_500"] == "HTTP 500: boom"
    assert m.total_output_tokens == 8 and m.total_prompt_tokens == 20
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.total_throughput == pytest.approx(14.0)
    assert m.ttft is not None and m.ttft.mean == pytest.approx(200.0)
    assert m.itl is not None and m.itl.count == 6 and m.itl.p50 == pytest.approx(15.0)
    # TPOT per request: (e2e - ttft) / (out - 1) = 10 ms and 20 ms
    assert m.tpot is not None and m.tpot.mean == pytest.approx(15.0)
    assert m.token_sources == {"usage": 2}
    assert m.goodput is None and m.good_requests is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [
        _ok(0.1, (0.01, 0.01), out=3),  # ttft 100 ms, tpot 10 ms: good
        _ok(0.5, (0.01, 0.01), out=3),  # ttft too slow
        _ok(0.1, (0.05, 0.05), out=3),  # tpot 50 ms: too slow
        _failed("timeout", "slow"),  # failures are never good
    ]
    m = compute_metrics(results, duration_s=4.0, slo=SLO(ttft_ms=200, itl_ms=20))
    assert m.good_requests == 1
    assert m.goodput == pytest.approx(0.25)
    only_ttft = compute_metrics(results, duration_s=4.0, slo=SLO(ttft_ms=200))
    assert only_ttft.good_requests == 2


def test_slo_validation() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        SLO(ttft_ms=0)
    with pytest.raises(ValueError, match="itl_ms"):
        SLO(itl_ms=-1)


def test_all_failed_load_point_has_no_latency() -> None:
    m = compute_metrics([_failed("connect_error", "x")] * 3, duration_s=0.5)
    assert (m.ok, m.failed) == (0, 3)
    assert m.ttft is None and m.e2e is None and m.output_throughput == 0.0
    d = m.to_dict()
    assert d["ttft_ms"] is None and d["errors"] == {"connect_error": 3}
