"""`ferry bench` end to end against a real OpenAI-compatible server on loopback (the naive HF baseline
serving a tiny random Llama): JSON fields, counts, both endpoints, both token-count paths, open loop, plot.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferry.cli import main

RECORD_FIELDS = {
    "label", "url", "model", "endpoint", "mode", "load", "load_label", "num_requests", "ok", "failed", "errors",
    "error_examples", "duration_s", "total_prompt_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_throughput", "token_sources", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "slo",
    "good_requests", "goodput", "memory", "workload", "machine",
}
STATS_FIELDS = {"count", "mean", "p50", "p90", "p99"}
WORKLOAD_FIELDS = {"dataset", "num_requests", "duration_s", "input_len", "output_len", "max_tokens", "ignore_eos",
                   "temperature", "seed", "endpoint", "request_usage", "timeout_s", "warmup", "tokenizer", "slo"}
MACHINE_FIELDS = {"hostname", "platform", "python", "cpu", "cpu_flags", "cpu_count", "memory_gib", "gpus",
                  "ferry_version"}


def bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "results.json"
    rc = main(["bench", "--no-progress", "--out", str(out), *args])
    return rc, json.loads(out.read_text())


def test_closed_loop_json_has_every_field_and_counts_add_up(naive_server: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = bench(tmp_path, "--url", naive_server.url, "--label", "naive", "--concurrency", "1,3",
                       "--num-requests", "6", "--max-tokens", "8", "--ignore-eos",
                       "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000")
    assert rc == 0
    assert report["schema"] == "ferry.bench/1" and "api_key" not in report["options"]
    records = report["records"]
    assert [(r["label"], r["mode"], r["load"]) for r in records] == [("naive", "concurrency", 1),
                                                                   ("naive", "concurrency", 3)]
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert set(r["workload"]) == WORKLOAD_FIELDS and set(r["machine"]) == MACHINE_FIELDS
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(r[key]) == STATS_FIELDS
            assert r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"]
        assert r["model"] == "tiny-llama" and r["url"] == naive_server.url + "/v1"
        assert (r["num_requests"], r["ok"], r["failed"], r["errors"]) == (6, 6, 0, {})
        # ignore_eos: every request generates exactly max_tokens, as reported by the usage chunk
        assert r["token_sources"] == {"usage": 6}
        assert r["total_output_tokens"] == 6 * 8
        assert r["e2e_ms"]["count"] == r["ttft_ms"]["count"] == 6
        assert r["output_throughput"] == pytest.approx(48 / r["duration_s"])
        assert r["request_throughput"] == pytest.approx(6 / r["duration_s"])
        assert r["total_throughput"] == pytest.approx((r["total_prompt_tokens"] + 48) / r["duration_s"])
        assert r["good_requests"] == 6 and r["goodput"] == pytest.approx(r["request_throughput"])
        assert r["workload"]["max_tokens"] == 8 and r["workload"]["ignore_eos"] is True
        # the server's RSS from its /metrics (process_resident_memory_bytes), before and after the point
        for when in ("before", "after"):
            assert r["memory"][when]["source"] == "metrics" and r["memory"][when]["rss_bytes"] > 10 * 2**20
            assert r["memory"][when]["peak_bytes"] is None  # /metrics has no peak
    out = capsys.readouterr().out
    assert "naive" in out and "c=3" in out and "12 requests, 12 ok, 0 failed" in out
    assert "RSS after MiB" in out  # the memory table


def test_completions_endpoint_and_open_loop_rate(naive_server: Any, tmp_path: Path) -> None:
    rc, report = bench(tmp_path, "--url", naive_server.url, "--endpoint", "completions", "--request-rate",
                       "50,inf", "--num-requests", "4", "--max-tokens", "5", "--ignore-eos", "--seed", "1")
    assert rc == 0
    assert [r["load"] for r in report["records"]] == [50.0, "inf"]
    for r in report["records"]:
        assert r["endpoint"] == "completions" and r["mode"] == "rate"
        assert (r["ok"], r["failed"], r["total_output_tokens"]) == (4, 0, 20)


def test_duration_bounds_a_run_without_a_request_count(naive_server: Any, tmp_path: Path) -> None:
    rc, report = bench(tmp_path, "--url", naive_server.url, "--concurrency", "2", "--duration", "0.5",
                       "--max-tokens", "4", "--ignore-eos")
    r = report["records"][0]
    assert rc == 0 and r["workload"]["num_requests"] is None and r["workload"]["duration_s"] == 0.5
    assert r["ok"] >= 1 and r["failed"] == 0


def _greedy_text(url: str, spec_body: dict[str, Any], max_tokens: int) -> str:
    body = {"model": "tiny-llama", **spec_body, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    resp.raise_for_status()
    return resp.json()["choices"][0]["message"]["content"]


def test_tokenizer_counts_tokens_when_no_usage_chunk(naive_server: Any, tiny_llama_dir: Path,
                                                     tmp_path: Path) -> None:
    from ferry.bench.tokens import load_tokenizer
    from ferry.bench.workload import WorkloadConfig, build_requests

    rc, report = bench(tmp_path, "--url", naive_server.url, "--num-requests", "2", "--max-tokens", "12",
                       "--ignore-eos", "--no-usage", "--tokenizer", str(tiny_llama_dir))
    r = report["records"][0]
    assert rc == 0 and r["token_sources"] == {"tokenizer": 2} and r["workload"]["request_usage"] is False
    # the same greedy requests, answered without streaming, re-encoded with the same tokenizer
    tok = load_tokenizer(str(tiny_llama_dir))
    specs = build_requests(WorkloadConfig(max_tokens=12), 2)
    expected = sum(len(tok.encode(_greedy_text(naive_server.url, s.body("chat"), 12))) for s in specs)
    assert r["total_output_tokens"] == expected


def test_chunks_counted_without_usage_or_tokenizer(fault_server: Any, no_usage_chunks: tuple[str, ...],
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = bench(tmp_path, "--url", fault_server.url, "--num-requests", "3")
    r = report["records"][0]
    assert rc == 0 and r["model"] == "no-usage"  # discovered from /v1/models
    assert r["token_sources"] == {"chunks": 3} and r["total_output_tokens"] == 3 * len(no_usage_chunks)
    assert r["itl_ms"]["count"] == 3 * (len(no_usage_chunks) - 1)
    assert r["memory"] == {"before": None, "after": None}  # no /metrics page: memory unknown
    out = capsys.readouterr().out
    assert "approximate" in out and "RSS after MiB" not in out


def test_plot_writes_a_png(naive_server: Any, fault_server: Any, tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    rc = main(["bench", "--no-progress", "--url", naive_server.url, "--url", fault_server.url,
               "--label", "naive", "--label", "other", "--concurrency", "1,2", "--num-requests", "2",
               "--max-tokens", "4", "--plot", str(png)])
    assert rc == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 200
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (height, width)


def test_bad_arguments_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--url", "localhost:8000"]) == 2
    assert "http://" in capsys.readouterr().err
    assert main(["bench", "--url", "http://127.0.0.1:9", "--concurrency", "1,x"]) == 2
    assert "not a number" in capsys.readouterr().err
    missing = tmp_path / "nope.jsonl"
    assert main(["bench", "--url", "http://127.0.0.1:9", "--dataset", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", "--url", "http://127.0.0.1:9", "--label", "a", "--label", "b"]) == 2
