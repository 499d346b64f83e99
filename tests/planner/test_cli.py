"""`ferry plan` end to end through `ferry.cli.main`: table, JSON, Markdown, PNGs, profiles, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ferry.cli import main
from ferry.planner.calibrate import Profile
from ferry.planner.memory import kv_token_capacity
from ferry.planner.catalog import resolve_model
from ferry.planner.throughput import Efficiency

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_plan_for_llama_70b(capsys: pytest.CaptureFixture[str]) -> None:
    d = _json(capsys, ["--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--dtype", "bf16", "--rps", "2",
                       "--peak-rps", "6", "--prompt-tokens", "1000", "--output-tokens", "200"])
    assert d["memory"]["gpus"] >= 2
    assert d["memory"]["kv_bytes_per_token"] == 327_680
    assert d["traffic"]["mean_rps"] == pytest.approx(2) and d["traffic"]["peak_rps"] == pytest.approx(6)
    names = [o["name"] for o in d["options"]]
    assert names == ["on-prem", "cloud on-demand", "cloud reserved", "API", "hybrid on-prem + cloud",
                     "hybrid on-prem + API"]
    assert d["recommendation"]["option"] in names
    assert d["recommendation"]["reasons"] and all(isinstance(r, str) for r in d["recommendation"]["reasons"])
    assert d["throughput"]["replicas_peak"] >= d["throughput"]["replicas_mean"] >= 1
    assert d["slo"]["met"] and d["throughput"]["serving"]["itl_s"] <= 0.1


def test_more_traffic_means_more_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    peaks = [_json(capsys, ["--model", "qwen2.5-7b", "--gpu", "l4", "--rps", str(r), "--peak-rps", str(2 * r)])
             ["throughput"]["replicas_peak"] for r in (0.5, 5, 50)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]


def test_restricted_share_keeps_capacity_on_prem(capsys: pytest.CaptureFixture[str]) -> None:
    d = _json(capsys, ["--model", "llama-3.1-8b", "--rps", "20", "--peak-rps", "60", "--restricted-share", "0.4"])
    opts = {o["name"]: o for o in d["options"]}
    assert not opts["API"]["allowed"] and not opts["cloud on-demand"]["allowed"]
    assert opts[d["recommendation"]["option"]]["allowed"]
    capacity = d["throughput"]["replica_capacity_rps"]
    for name in ("hybrid on-prem + cloud", "hybrid on-prem + API"):
        assert opts[name]["onprem_replicas"] * capacity >= 0.4 * d["traffic"]["peak_rps"]
    assert "restricted" in d["recommendation"]["reasons"][0]


def test_table_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, plot = tmp_path / "plan.md", tmp_path / "plan.png"
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "a100-80g", "--rps", "3", "--peak-rps", "9",
                 "--report", str(report), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "Recommendation:" in out and "Monthly cost" in out and "active of" in out
    assert "input_per_mtok" in out  # the gateway fragment
    md = report.read_text()
    assert md.startswith("# ferry plan: mixtral-8x7b on a100-80g")
    assert "## Recommendation" in md and "| option |" in md and "```yaml" in md
    for name in ("plan-cost.png", "plan-load.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        import matplotlib.image

        assert matplotlib.image.imread(str(tmp_path / name)).shape[0] > 100


def test_gateway_fragment_is_a_valid_gateway_config(capsys: pytest.CaptureFixture[str]) -> None:
    from ferry.gateway.config import parse_config

    d = _json(capsys, ["--model", "llama-3.1-8b", "--rps", "4", "--peak-rps", "12"])
    cfg = parse_config(yaml.safe_load(d["gateway"]["config"]))
    backend = cfg.backends[0]
    assert backend.location == "onprem"
    assert backend.input_per_mtok == pytest.approx(d["gateway"]["onprem_input_per_mtok"], abs=1e-4)
    assert backend.output_per_mtok == pytest.approx(d["gateway"]["onprem_output_per_mtok"], abs=1e-4)
    assert backend.output_per_mtok > 0


def test_smollm2_on_cpu_with_a_fixed_kv_pool(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    d = _json(capsys, ["--model", str(smollm2_path), "--gpu", "cpu", "--dtype", "fp32", "--kv-cache-memory", "64MiB",
                       "--rps", "0.2", "--prompt-tokens", "64", "--output-tokens", "32", "--context", "1024"])
    assert d["kv_dtype"] == "fp32" and (d["memory"]["tp"], d["memory"]["pp"]) == (1, 1)
    assert d["memory"]["kv_tokens"] == kv_token_capacity(resolve_model("smollm2-135m"), 64 * 1024**2) == 1456


def test_traffic_file_and_costs_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traffic, costs = tmp_path / "t.yaml", tmp_path / "c.yaml"
    traffic.write_text("hourly_rps: [" + ", ".join(["0.5"] * 16 + ["4"] * 8) + "]\n"
                       "prompt_tokens: 800\noutput_tokens: 200\n")
    costs.write_text("api: {input_usd_per_mtok: 100, output_usd_per_mtok: 100}\n")
    d = _json(capsys, ["--model", "llama-3.1-8b", "--traffic", str(traffic), "--costs", str(costs)])
    assert d["traffic"]["peak_rps"] == 4 and d["traffic"]["prompt_tokens"] == 800
    assert d["recommendation"]["option"] != "API"  # at $100/Mtok the API never wins


def test_profile_sets_efficiency_and_predicts_a_concurrency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eff = Efficiency(memory=0.05, compute=0.02, prefill=0.05, step_overhead_s=0.01)
    prof = tmp_path / "profile.json"
    Profile("smollm2-135m", "cpu", "fp32", "fp32", eff, 64, 32, (), 0.0).save(prof)
    d = _json(capsys, ["--profile", str(prof), "--rps", "0.1", "--concurrency", "3"])
    assert d["model"]["name"] == "smollm2-135m" and d["gpu"]["name"] == "cpu" and d["dtype"] == "fp32"
    assert d["efficiency"]["memory"] == 0.05 and d["efficiency"]["source"].startswith("calibrated")
    assert d["traffic"]["prompt_tokens"] == 64 and d["prediction"]["batch"] == 3
    assert d["prediction"]["output_tok_s"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-3.1-8b", "--gpu", "tpu-v9", "--rps", "1"], "unknown GPU 'tpu-v9'"),
    (["--model", "not-a-model", "--rps", "1"], "unknown model 'not-a-model'"),
    (["--model", "llama-3.1-8b", "--rps", "-1"], "--rps must be a positive number"),
    (["--model", "llama-3.1-8b", "--rps", "2", "--peak-rps", "1"], "--peak-rps must be"),
    (["--model", "llama-3.1-8b", "--peak-rps", "3"], "give --rps"),
    (["--model", "llama-3.1-8b", "--plot", "x.png"], "--plot needs traffic"),
    (["--model", "llama-3.1-8b", "--concurrency", "4"], "--concurrency needs traffic"),
    (["--calibrate", "http://x", "--calibrate-from", "b.json", "--model", "smollm2-135m"], "not both"),
    (["--calibrate-from", "/nonexistent.json", "--model", "smollm2-135m", "--gpu", "cpu"], "cannot read bench file"),
    (["--rps", "1"], "--model is required"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--restricted-share", "1.5"], "--restricted-share must be in"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--slo-itl-ms", "0"], "slo-itl must be a positive"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--kv-cache-memory", "lots"], "not a size"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--dtype", "fp4"], "unknown dtype"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--traffic", "/nonexistent.yaml"], "cannot read traffic file"),
    (["--model", "llama-3.1-8b", "--rps", "1", "--profile", "/nonexistent.json"], "cannot read profile"),
    (["--calibrate", "localhost:1", "--model", "smollm2-135m", "--gpu", "cpu"], "http"),
])
def test_bad_input_exits_2_with_a_clear_message(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert "ferry plan: error: " in captured.err and message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_malformed_traffic_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("hourly_rps: [1, 2, 3]\nprompt_tokens: 10\noutput_tokens: 10\n")
    assert main(["plan", "--model", "llama-3.1-8b", "--traffic", str(bad)]) == 2
    assert "24 values" in capsys.readouterr().err


def test_calibrate_against_a_closed_port_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["plan", "--calibrate", f"http://127.0.0.1:{port}", "--model", "smollm2-135m", "--gpu", "cpu",
                 "--calibrate-timeout", "5"]) == 2
    assert "calibration against" in capsys.readouterr().err
