"""Traffic: the diurnal curve keeps mean and peak; percentiles; traffic files and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.planner.errors import PlannerError
from ferry.planner.traffic import Traffic, diurnal_profile, load_traffic, make_traffic


@pytest.mark.parametrize("mean,peak", [(1.0, 1.0), (2.0, 3.0), (5.0, 15.0), (0.3, 6.0)])
def test_diurnal_profile_has_the_given_mean_and_peak(mean: float, peak: float) -> None:
    hours = diurnal_profile(mean, peak)
    assert len(hours) == 24
    assert sum(hours) / 24 == pytest.approx(mean)
    assert max(hours) == pytest.approx(peak, rel=1e-6)
    assert hours[14] == max(hours)
    assert min(hours) > 0


def test_percentiles_by_hand() -> None:
    t = Traffic(tuple(float(h) for h in range(24)), 100, 50)
    assert t.percentile_rps(0) == 0 and t.percentile_rps(100) == 23
    assert t.percentile_rps(50) == pytest.approx(11.5)
    assert t.share_at_or_below(11) == pytest.approx(12 / 24)
    assert t.monthly_requests(730) == pytest.approx(11.5 * 3600 * 730)


def test_traffic_file_with_hourly_rates(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("hourly_rps: [" + ", ".join(["1"] * 12 + ["3"] * 12) + "]\nprompt_tokens: 200\n"
                 "output_tokens: 100\nrestricted_share: 0.25\n")
    t = load_traffic(f)
    assert (t.mean_rps, t.peak_rps, t.restricted_share) == (2.0, 3.0, 0.25)
    assert load_traffic(f, restricted_share=0.5).restricted_share == 0.5


@pytest.mark.parametrize("text,message", [
    ("hourly_rps: [1, 2]\nprompt_tokens: 1\noutput_tokens: 1\n", "24 values"),
    ("rps: 1\nprompt_tokens: 1\n", "output_tokens is required"),
    ("rps: -2\nprompt_tokens: 1\noutput_tokens: 1\n", "--rps must be a positive number"),
    ("rps: 2\npeak_rps: 1\nprompt_tokens: 1\noutput_tokens: 1\n", "--peak-rps must be a number >= --rps"),
    ("rps: 2\nprompt_tokens: 1\noutput_tokens: 1\nburst: 3\n", "unknown keys"),
    ("- just a list\n", "must be a mapping"),
    ("rps: [1\n", "not valid YAML"),
    ("rps: 1\nprompt_tokens: 1\noutput_tokens: 1\nrestricted_share: 2\n", "restricted_share must be in"),
    ("hourly_rps: [" + ", ".join(["1"] * 23 + ["-1"]) + "]\nprompt_tokens: 1\noutput_tokens: 1\n", "hourly_rps"),
])
def test_malformed_traffic_files_give_clear_messages(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(PlannerError, match=message):
        load_traffic(f)


def test_missing_rates_and_impossible_peaks() -> None:
    with pytest.raises(PlannerError, match="give --rps"):
        make_traffic(rps=None, peak_rps=None, prompt_tokens=1, output_tokens=1)
    with pytest.raises(PlannerError, match="peak/mean must be below 24"):
        diurnal_profile(1.0, 30.0)
    with pytest.raises(PlannerError, match="cannot read traffic file"):
        load_traffic("/nonexistent/traffic.yaml")
