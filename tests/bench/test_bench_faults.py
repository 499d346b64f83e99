"""Bad endpoints: each failure is counted by kind, the run goes on, ends with a summary and exit 1, and no
traceback reaches the user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ferry.cli import main


def run_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    out = tmp_path / "r.json"
    rc = main(["bench", "--no-progress", "--out", str(out), "--max-tokens", "4", *args])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return rc, json.loads(out.read_text())["records"], text


def test_port_that_closes_connections(closing_port: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, records, text = run_bench(tmp_path, capsys, "--url", closing_port.url, "--model", "m",
                                  "--concurrency", "2", "--num-requests", "5")
    r = records[0]
    assert rc == 1
    assert (r["num_requests"], r["ok"], r["failed"], r["errors"]) == (5, 0, 5, {"disconnected": 5})
    assert closing_port.accepted >= 5
    assert r["ttft_ms"] is None and r["output_throughput"] == 0.0
    assert "5 requests, 0 ok, 5 failed" in text and "5 x disconnected" in text


def test_unreachable_port(unreachable_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, records, text = run_bench(tmp_path, capsys, "--url", unreachable_url, "--num-requests", "3")
    assert rc == 1 and records[0]["errors"] == {"connect_error": 3}
    assert records[0]["model"] == "default"  # /v1/models could not be asked either
    assert "3 x connect_error: cannot connect" in text


@pytest.mark.parametrize("model, kind, message", [
    ("http-500", "http_500", "HTTP 500: engine exploded"),
    ("http-429", "http_429", "HTTP 429: slow down"),
    ("cut", "stream_cut", ""),
    ("garbage", "bad_response", "not an OpenAI stream"),
    ("not-streaming", "bad_response", "expected an SSE stream, got application/json"),
    ("stream-error", "stream_error", "out of blocks"),
    ("hang", "timeout", "no complete answer within 0.5s"),
])
def test_server_faults_are_counted_by_kind(fault_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           model: str, kind: str, message: str) -> None:
    rc, records, text = run_bench(tmp_path, capsys, "--url", fault_server.url, "--model", model,
                                  "--concurrency", "2", "--num-requests", "4", "--timeout", "0.5")
    r = records[0]
    assert rc == 1
    assert (r["ok"], r["failed"], r["errors"]) == (0, 4, {kind: 4})
    assert message in r["error_examples"][kind]
    assert f"4 x {kind}" in text


def test_run_goes_on_past_bad_servers(naive_server: Any, closing_port: Any, unreachable_url: str,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, records, text = run_bench(tmp_path, capsys, "--url", unreachable_url, "--url", closing_port.url, "--url",
                                  naive_server.url, "--label", "down", "--label", "closing", "--label", "naive",
                                  "--concurrency", "1,2", "--num-requests", "3")
    assert rc == 1
    by = {(r["label"], r["load"]): r for r in records}
    assert len(by) == 6
    for load in (1, 2):
        assert by[("down", load)]["errors"] == {"connect_error": 3}
        assert by[("closing", load)]["errors"] == {"disconnected": 3}
        assert (by[("naive", load)]["ok"], by[("naive", load)]["failed"]) == (3, 0)
    assert "18 requests, 6 ok, 12 failed" in text
