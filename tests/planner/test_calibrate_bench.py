"""`--calibrate-from FILE`: a `ferry bench --out` file becomes the plan's throughput model, through the same
path as a live `--calibrate` sweep; checked against the real `ferry serve` of the default model on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ferry_server import ServerProcess

from ferry.cli import main
from ferry.planner.calibrate import load_profile, measurements_from_bench
from ferry.planner.catalog import get_dtype, get_gpu, resolve_model
from ferry.planner.errors import PlannerError
from ferry.planner.throughput import Replica, serving_point

CPU = Replica(resolve_model("smollm2-135m"), get_gpu("cpu"), get_dtype("fp32"), get_dtype("fp32"))
PLAN = ["--model", "smollm2-135m", "--gpu", "cpu", "--dtype", "fp32"]


def _record(label: str, concurrency: int, **over: Any) -> dict[str, Any]:
    r = {"label": label, "url": f"http://{label}/v1", "mode": "concurrency", "load": concurrency, "ok": 4,
         "failed": 0, "duration_s": 2.0, "total_prompt_tokens": 4 * 33, "total_output_tokens": 4 * 16,
         "output_throughput": 32.0 * concurrency ** 0.5, "ttft_ms": {"count": 4, "mean": 90.0 * concurrency},
         "tpot_ms": {"count": 4, "mean": 40.0 + 5 * concurrency}}
    r.update(over)
    return r


def _doc(*records: dict[str, Any]) -> dict[str, Any]:
    return {"schema": "ferry.bench/1", "records": list(records)}


def test_bench_records_become_measurements() -> None:
    label, ms = measurements_from_bench(_doc(_record("a", 4), _record("a", 1),
                                             _record("a", 2, mode="rate", load=3.0)))
    assert label == "a" and [m.concurrency for m in ms] == [4, 1]  # open-loop points are skipped
    m = ms[1]
    assert (m.requests, m.prompt_tokens, m.output_tokens) == (4, 33, 16)
    assert (m.ttft_s, m.itl_s, m.output_tok_s, m.wall_s) == pytest.approx((0.09, 0.045, 32.0, 2.0))


@pytest.mark.parametrize("doc,label,message", [
    (_doc(_record("a", 1), _record("b", 1)), None, "records of 2 servers (a, b); pick one with --bench-label"),
    (_doc(_record("a", 1)), "c", "no records for --bench-label 'c'"),
    (_doc(_record("a", 1, mode="rate", load=2.0)), None, "closed-loop load points"),
    (_doc(_record("a", 1, failed=2)), None, "2 requests failed"),
    (_doc(_record("a", 1, tpot_ms=None)), None, "no request measured both"),
    (_doc(_record("a", 1), _record("a", 1)), None, "same concurrency twice"),
    (_doc(_record("a", 1, ok="x")), None, "malformed"),
])
def test_bench_files_unfit_for_calibration_are_refused(doc: dict[str, Any], label: str | None, message: str) -> None:
    with pytest.raises(PlannerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        measurements_from_bench(doc, label)


def test_calibrate_from_picks_a_label_and_rejects_other_files(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bench, prof = tmp_path / "b.json", tmp_path / "p.json"
    bench.write_text(json.dumps(_doc(_record("a", 1), _record("a", 4), _record("b", 1))))
    assert main(["plan", "--calibrate-from", str(bench), *PLAN, "--profile-out", str(prof)]) == 2
    assert "--bench-label" in capsys.readouterr().err
    assert main(["plan", "--calibrate-from", str(bench), "--bench-label", "a", *PLAN, "--profile-out",
                 str(prof)]) == 0
    p = load_profile(prof)
    assert [m.concurrency for m in p.measurements] == [1, 4] and p.url.endswith("(a)")
    bench.write_text(json.dumps({"records": []}))
    assert main(["plan", "--calibrate-from", str(bench), *PLAN]) == 2
    assert "not a `ferry bench --out` file" in capsys.readouterr().err


def _predicted_tok_s(profile_path: Path, concurrency: int) -> float:
    p = load_profile(profile_path)
    return serving_point(CPU, concurrency, p.prompt_tokens, p.output_tokens, p.efficiency).output_tok_s


def test_bench_file_and_live_server_give_the_same_calibration(smollm2_path: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A real `ferry bench` and a live `--calibrate` against one real `ferry serve`: the live sweep's own bench
    file reproduces its profile exactly, and a `ferry bench` file of the same workload fits the same model."""
    bench, live_bench = tmp_path / "bench.json", tmp_path / "live-bench.json"
    live, from_live, from_bench = tmp_path / "live.json", tmp_path / "from-live.json", tmp_path / "from-bench.json"
    with ServerProcess(smollm2_path, tmp_path / "serve.log") as server:
        assert main(["bench", "--no-progress", "--url", server.base_url, "--endpoint", "completions",
                     "--dataset", "synthetic", "--input-len", "32", "--output-len", "16", "--ignore-eos",
                     "--concurrency", "1,4", "--num-requests", "8", "--warmup", "1", "--out", str(bench)]) == 0
        assert main(["plan", "--calibrate", server.base_url, *PLAN, "--prompt-tokens", "32", "--output-tokens", "16",
                     "--calibrate-concurrency", "1,4", "--calibrate-requests", "8", "--profile-out", str(live),
                     "--bench-out", str(live_bench)]) == 0
    assert main(["plan", "--calibrate-from", str(live_bench), *PLAN, "--profile-out", str(from_live)]) == 0
    assert main(["plan", "--calibrate-from", str(bench), *PLAN, "--profile-out", str(from_bench)]) == 0
    capsys.readouterr()
    # the same measurements through the one path: the same profile, within 5% (in fact equal)
    a, b = load_profile(live), load_profile(from_live)
    assert a.measurements == b.measurements
    for c in (1, 2, 4, 8):
        assert _predicted_tok_s(from_live, c) == pytest.approx(_predicted_tok_s(live, c), rel=0.05)
    # a `ferry bench` file of the same workload: the same tokens per request, and throughput of the same
    # size (two runs on a shared CPU differ by tens of percent, so this bound is loose; see docs/planner.md)
    fb = load_profile(from_bench)
    assert (fb.prompt_tokens, fb.output_tokens) == (a.prompt_tokens, a.output_tokens) == (32, 16)
    for c in (1, 4):
        ratio = _predicted_tok_s(from_bench, c) / _predicted_tok_s(live, c)
        assert 0.5 < ratio < 2, (c, ratio)
