"""Ratios over peers and goal verdicts, as benchmarks/serving.py and benchmarks/gpu.py print them."""

from __future__ import annotations

import pytest

from ferry.bench.client import RequestResult, Target
from ferry.bench.compare import Goal, judge, ratio_table
from ferry.bench.metrics import compute_metrics
from ferry.bench.runner import LoadPoint, PointResult


def point(label: str, concurrency: int, tokens: int, seconds: float, ok: bool = True) -> PointResult:
    """One load point whose requests produced ``tokens`` output tokens over ``seconds``."""
    r = RequestResult(ok=ok, start=0.0, e2e=seconds, ttft=0.1, output_tokens=tokens if ok else 0,
                      error_kind=None if ok else "timeout")
    return PointResult(Target(f"http://{label}/v1", label, "m"), LoadPoint("concurrency", concurrency), (r,),
                       compute_metrics([r], seconds))


POINTS = [point("ferry", 1, 100, 2.0), point("ferry", 32, 900, 1.0), point("llama-server", 1, 100, 1.0),
          point("llama-server", 32, 300, 1.0), point("naive", 32, 10, 0.5, ok=False)]
GOALS = [Goal("llama-server", "c=1", 1.0), Goal("llama-server", "c=32", 3.0), Goal("vllm-cpu", "c=32", 1.5),
         Goal("naive", "c=32", 25.0), Goal("llama-server", "c=4", 1.0)]


def test_verdicts_met_not_met_and_not_measured() -> None:
    verdicts = judge(POINTS, "ferry", GOALS, skipped={"vllm-cpu": "cannot import vllm"})
    assert [(v.ratio, v.met) for v in verdicts] == [(0.5, False), (3.0, True), (None, None), (None, None),
                                                    (None, None)]
    lines = [v.line("ferry") for v in verdicts]
    assert lines[0] == "output tok/s ferry/llama-server at c=1: 0.50x (goal >= 1x: NOT met)"
    assert lines[1] == "output tok/s ferry/llama-server at c=32: 3.00x (goal >= 3x: met)"
    assert "not measured (peer skipped: cannot import vllm)" in lines[2]
    # a point where every request failed is no measurement
    assert "not measured (naive has no c=32 point in this run)" in lines[3]
    assert "not measured (llama-server has no c=4 point in this run)" in lines[4]
    assert verdicts[1].to_dict() == {"peer": "llama-server", "load": "c=32", "minimum": 3.0, "ratio": 3.0,
                                     "met": True, "reason": None}


def test_ratio_table_rows() -> None:
    table = ratio_table(POINTS[:4], "ferry", ["llama-server"]).splitlines()
    assert table[0].split("|")[1:-1] == [
        " load ", " ferry out tok/s ", " llama-server out tok/s ", " ferry/llama-server ",
        " ferry TTFT p99 ms ", " llama-server TTFT p99 ms "]
    cells = [c.strip() for c in table[3].split("|")[1:-1]]
    assert cells == ["c=32", "900.0", "300.0", "3.00x", "100", "100"]


def test_a_goal_needs_a_positive_minimum() -> None:
    with pytest.raises(ValueError, match="positive"):
        Goal("naive", "c=1", 0)


def test_vllm_style_result_lines() -> None:
    from ferry.bench.report import format_vllm_style

    r = RequestResult(ok=True, start=0.0, e2e=1.0, ttft=0.1, itls=(0.3, 0.6), output_tokens=3, prompt_tokens=10)
    p = PointResult(Target("http://x/v1", "ferry", "m"), LoadPoint("rate", 4.0), (r,), compute_metrics([r], 2.0))
    lines = format_vllm_style(p).splitlines()
    values = {line[:40].strip(): line[40:] for line in lines if not line.startswith(("=", "-"))}
    assert values == {
        "Successful requests:": "1", "Failed requests:": "0", "Benchmark duration (s):": "2.00",
        "Total input tokens:": "10", "Total generated tokens:": "3", "Request throughput (req/s):": "0.50",
        "Output token throughput (tok/s):": "1.50", "Total Token throughput (tok/s):": "6.50",
        "Mean TTFT (ms):": "100.00", "Median TTFT (ms):": "100.00", "P99 TTFT (ms):": "100.00",
        "Mean TPOT (ms):": "450.00", "Median TPOT (ms):": "450.00", "P99 TPOT (ms):": "450.00",
        "Mean ITL (ms):": "450.00", "Median ITL (ms):": "450.00", "P99 ITL (ms):": "597.00",
    }
    assert "ferry rate=4/s" in lines[0] and lines[-1] == "=" * 50
