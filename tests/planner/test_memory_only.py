"""`ferry plan` without traffic answers the memory question only: no throughput, replicas or cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli import main


def test_memory_only_text_for_llama_8b(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "16.06 GB" in out and "KV bytes per token          131,072" in out
    assert "1 GPU per replica: tensor parallel 1 x pipeline 1" in out
    assert "KV tokens per replica" in out and "sequences at full context" in out
    assert "memory only" in out and "engines that run this layout: ferry" in out
    for section in ("Throughput", "Monthly cost", "Recommendation", "Gateway config"):
        assert section not in out


def test_memory_only_json_for_llama_8b(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    m = d["memory"]
    assert m["weight_bytes"] == pytest.approx(16.06e9, rel=1e-3) and m["kv_bytes_per_token"] == 131_072
    assert (m["tp"], m["pp"], m["gpus"]) == (1, 1, 1)
    assert m["kv_tokens"] == m["per_gpu_kv_bytes"] // (16 * 131_072) * 16
    assert m["max_concurrent_seqs"] == m["kv_tokens"] // 8192 and d["context"] == 8192
    assert d["engines"]["ferry_runs"] and "ferry" in d["engines"]["engines"]
    for key in ("traffic", "throughput", "options", "recommendation", "gateway", "deployment"):
        assert key not in d


def test_memory_only_markdown_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "plan.md"
    assert main(["plan", "--model", "llama-3.1-70b", "--report", str(report)]) == 0
    md = report.read_text()
    assert "## Memory" in md and "## Engines" in md and "## Monthly cost" not in md


def test_with_traffic_the_plan_is_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--rps", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["memory"]["kv_bytes_per_token"] == 131_072
    assert {"traffic", "throughput", "options", "recommendation", "gateway", "deployment"} <= set(d)
