"""The planner against the real engine and server: KV capacity and a calibrated prediction."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from ferry_server import ServerProcess

from ferry import LLM
from ferry.cli import main
from ferry.loader import load_model
from ferry.planner.catalog import resolve_model
from ferry.planner.memory import kv_token_capacity
from ferry.shapes import ModelShape


@pytest.mark.parametrize("kv_cache_memory", [8 << 20, 50_000_000])
def test_kv_token_capacity_equals_the_engine_pool(smollm2_path: Path, kv_cache_memory: int) -> None:
    llm = LLM(str(smollm2_path), kv_cache_memory=kv_cache_memory)
    stats = llm.engine.stats()
    engine_tokens = stats.num_total_blocks * llm.engine.config.cache.block_size
    assert kv_token_capacity(resolve_model(str(smollm2_path)), kv_cache_memory) == engine_tokens


@pytest.mark.parametrize("fixture", ["smollm2_path", "tiny_llama_dir", "tiny_qwen2_dir"])
def test_engine_and_planner_read_the_same_shape(request: pytest.FixtureRequest, fixture: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    arch, model = load_model(str(path)).arch, resolve_model(str(path))
    for f in fields(ModelShape):
        assert getattr(arch, f.name) == getattr(model, f.name), f.name


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_calibrated_prediction_matches_a_measurement_it_did_not_see(
        smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "serve.log"
    with ServerProcess(smollm2_path, log, "--kv-cache-memory", "256MiB") as server:
        profile = tmp_path / "profile.json"
        assert main(["plan", "--calibrate", server.base_url, "--model", str(smollm2_path),
                     "--gpu", "cpu", "--dtype", "fp32", "--calibrate-concurrency", "1,2,4",
                     "--calibrate-requests", "6", "--profile-out", str(profile)]) == 0
        plan = _json_out(capsys, ["plan", "--profile", str(profile), "--rps", "0.1",
                                  "--concurrency", "3", "--json"])
        predicted = plan["prediction"]["output_tok_s"]
        bench_out = tmp_path / "bench.json"
        capsys.readouterr()
        assert main(["bench", "--no-progress", "--url", server.base_url, "--endpoint",
                     "completions", "--concurrency", "3", "--num-requests", "9",
                     "--input-len", "64", "--output-len", "32", "--ignore-eos",
                     "--out", str(bench_out)]) == 0
        measured = json.loads(bench_out.read_text())["records"][0]["output_throughput"]
    print(f"calibrated plan at concurrency 3: predicted {predicted:.1f} output tok/s, "
          f"ferry bench measured {measured:.1f} ({(predicted / measured - 1) * 100:+.0f}%)")
    assert abs(predicted / measured - 1) <= 0.25
