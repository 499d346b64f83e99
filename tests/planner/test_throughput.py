"""The roofline by hand: decode memory-bound then compute-bound, prefill, closed-loop serving, SLO batch."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.planner.calibrate import predict_grid
from ferry.planner.catalog import get_dtype, get_gpu, resolve_model
from ferry.planner.throughput import (Efficiency, Replica, decode_step_time, max_batch_for_slo, prefill_flops,
                                      prefill_time, replicas_needed, serving_point)
from ferry.planner.errors import PlannerError

EFF = Efficiency(memory=0.8, compute=0.5, prefill=0.6, step_overhead_s=0.001)


def _replica(model: str = "llama-3.1-8b", gpu: str = "h100-sxm", dtype: str = "bf16", tp: int = 1) -> Replica:
    return Replica(resolve_model(model), get_gpu(gpu), get_dtype(dtype), get_dtype(dtype), tp=tp)


def test_decode_at_batch_one_is_memory_bound_by_hand() -> None:
    r = _replica()
    w = 8_030_261_248 * 2
    t = decode_step_time(r, 1, 1000, EFF)
    assert t == pytest.approx(0.001 + (w + 1000 * 131072) / (3350e9 * 0.8))
    assert 5e-3 < t < 8e-3  # ~6 ms per token: what vLLM-class engines report for 8B on one H100


def test_decode_at_large_batch_is_compute_bound_by_hand() -> None:
    r = _replica()
    matmul = 8_030_261_248 - 128256 * 4096  # the embedding lookup is not a matmul
    t = decode_step_time(r, 4096, 10, EFF)
    assert t == pytest.approx(0.001 + 4096 * 2 * matmul / (989e12 * 0.5))


def test_prefill_by_hand() -> None:
    r = _replica()
    n = 2000
    flops = 2 * (8_030_261_248 - 128256 * 4096) * n + 2 * 32 * 32 * 128 * n * n
    assert prefill_flops(r.model, n) == flops
    assert prefill_time(r, n, EFF) == pytest.approx(0.001 + flops / (989e12 * 0.6))


def test_serving_point_formulas() -> None:
    r = _replica()
    p = serving_point(r, 8, 500, 200, EFF)
    itl = decode_step_time(r, 8, 600, EFF) + 8 / 200 * prefill_flops(r.model, 500) / (989e12 * 0.6)
    ttft = prefill_time(r, 500, EFF) + 7 / 8 * itl / 2
    assert p.itl_s == pytest.approx(itl)
    assert p.ttft_s == pytest.approx(ttft)
    assert p.output_tok_s == pytest.approx(8 * 200 / (ttft + 199 * itl))
    assert p.requests_s == pytest.approx(p.output_tok_s / 200)


def test_tensor_parallel_is_faster_per_step_but_pays_communication() -> None:
    one, two = _replica("llama-3.1-70b", tp=4), _replica("llama-3.1-70b", tp=8)
    t4, t8 = decode_step_time(one, 1, 1000, EFF), decode_step_time(two, 1, 1000, EFF)
    assert t8 < t4
    assert two.comm_time(1) > one.comm_time(1) > 0


def test_throughput_grows_with_batch_and_so_does_itl() -> None:
    r = _replica()
    pts = [serving_point(r, b, 512, 256, EFF) for b in (1, 2, 4, 16, 64, 256)]
    assert all(a.output_tok_s < b.output_tok_s for a, b in zip(pts, pts[1:]))
    assert all(a.itl_s < b.itl_s for a, b in zip(pts, pts[1:]))


def test_slo_batch_is_the_edge() -> None:
    r = _replica()
    p = max_batch_for_slo(r, 512, 256, EFF, slo_ttft_s=2.0, slo_itl_s=0.02, max_batch=1024)
    assert p is not None and 1 < p.batch < 1024
    assert p.itl_s <= 0.02
    assert serving_point(r, p.batch + 1, 512, 256, EFF).itl_s > 0.02
    assert max_batch_for_slo(r, 512, 256, EFF, slo_ttft_s=2.0, slo_itl_s=0.001, max_batch=64) is None
    capped = max_batch_for_slo(r, 512, 256, EFF, slo_ttft_s=10, slo_itl_s=10, max_batch=7)
    assert capped is not None and capped.batch == 7


def test_replicas_needed_is_monotone_in_traffic() -> None:
    counts = [replicas_needed(rps, 3.2) for rps in (0, 0.1, 3.2, 3.3, 10, 50, 51)]
    assert counts == [0, 1, 1, 2, 4, 16, 16]
    assert counts == sorted(counts)


def test_vectorised_predictions_match_serving_point() -> None:
    r = _replica("smollm2-135m", "cpu", "fp32")
    rng = np.random.default_rng(0)
    for _ in range(5):
        mem, comp, pre = rng.uniform(0.01, 1, 3)
        oh = rng.uniform(0, 0.02)
        eff = Efficiency(memory=mem, compute=comp, prefill=pre, step_overhead_s=oh)
        batch = np.array([1.0, 3.0, 8.0])
        itl, ttft, tok = predict_grid(r, batch, 64, 32, np.array(mem), np.array(comp), np.array(pre), np.array(oh))
        for i, b in enumerate((1, 3, 8)):
            p = serving_point(r, b, 64, 32, eff)
            assert (itl[i], ttft[i], tok[i]) == pytest.approx((p.itl_s, p.ttft_s, p.output_tok_s))


def test_bad_efficiency_is_rejected() -> None:
    with pytest.raises(PlannerError, match="memory must be in"):
        Efficiency(memory=0)
    with pytest.raises(PlannerError, match="step_overhead_s"):
        Efficiency(step_overhead_s=-1)
