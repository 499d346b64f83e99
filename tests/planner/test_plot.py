"""The cost plot greys out splits that break the restricted share; counts read "1 replica", "2 replicas"."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli import main
from ferry.planner.catalog import get_dtype, get_gpu, resolve_model
from ferry.planner.plan import PlanInputs, make_plan
from ferry.planner.plot import split_series
from ferry.planner.pricing import load_costs
from ferry.planner.text import plural
from ferry.planner.throughput import default_efficiency
from ferry.planner.traffic import make_traffic


def _plan(restricted: float, rps: float = 20, peak: float = 60):  # noqa: ANN202
    model, gpu = resolve_model("llama-3.1-8b"), get_gpu("h100-sxm")
    traffic = make_traffic(rps=rps, peak_rps=peak, prompt_tokens=512, output_tokens=256, restricted_share=restricted)
    return make_plan(PlanInputs(model=model, gpu=gpu, dtype=get_dtype("bf16"), kv_dtype=get_dtype("bf16"),
                                context=8192, traffic=traffic, costs=load_costs(model),
                                efficiency=default_efficiency(gpu)))


def test_splits_below_the_restricted_share_are_greyed() -> None:
    load = _plan(0.4).load
    assert load is not None and load.k_min >= 1
    series = split_series(load)
    for s in series:
        if s.allowed:
            assert all(p.onprem_replicas >= load.k_min for p in s.points)
        else:  # every disallowed split, then the first allowed one so the line stays connected
            assert [p.onprem_replicas for p in s.points] == list(range(load.k_min + 1))
    assert {(s.target, s.allowed) for s in series} == {("cloud on-demand", False), ("cloud on-demand", True),
                                                       ("API", False), ("API", True)}


def test_nothing_is_greyed_without_a_restricted_share() -> None:
    load = _plan(0.0).load
    assert load is not None and all(s.allowed for s in split_series(load))


def test_plots_with_a_restricted_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--rps", "20", "--peak-rps", "60", "--restricted-share", "0.4",
                 "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p-cost.png").stat().st_size > 5000


def test_one_replica_reads_singular(capsys: pytest.CaptureFixture[str]) -> None:
    assert (plural(1, "replica"), plural(0, "replica"), plural(2, "GPU")) == ("1 replica", "0 replicas", "2 GPUs")
    assert main(["plan", "--model", "llama-3.1-8b", "--rps", "0.05", "--peak-rps", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 replicas" not in out and "1 GPUs" not in out and "replica(s)" not in out
    assert "1 replica" in out
