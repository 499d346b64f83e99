"""`ferry bench` against the real `ferry serve` (tiny random Llama) on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ferry.cli import main


def test_bench_ferry_serve_both_endpoints(ferry_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = main(["bench", "--no-progress", "--url", ferry_server.base_url, "--label", "ferry", "--concurrency", "1,4",
               "--num-requests", "8", "--max-tokens", "12", "--ignore-eos", "--out", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())["records"]
    for r in records:
        assert (r["ok"], r["failed"], r["token_sources"]) == (8, 0, {"usage": 8})
        assert r["total_output_tokens"] == 8 * 12  # ignore_eos: exactly max_tokens each
        assert r["ttft_ms"]["count"] == 8 and r["itl_ms"]["count"] > 0
    rc = main(["bench", "--no-progress", "--url", ferry_server.base_url, "--endpoint", "completions",
               "--request-rate", "inf", "--num-requests", "6", "--dataset", "synthetic", "--input-len", "20",
               "--output-len", "10", "--ignore-eos", "--out", str(out)])
    r = json.loads(out.read_text())["records"][0]
    assert rc == 0 and (r["ok"], r["total_output_tokens"]) == (6, 60)


def test_gguf_tokenizer_matches_the_hf_folder(smollm2_path: Path, hf_tokenizer_dir: Path) -> None:
    from ferry.bench.tokens import load_tokenizer

    a, b = load_tokenizer(str(smollm2_path)), load_tokenizer(str(hf_tokenizer_dir))
    text = "Bench tokens: naïve café, 12345 <|im_end|> done."
    assert a.encode(text) == b.encode(text) and a.decode(a.encode(text)) == text


def test_bench_imports_no_torch() -> None:
    code = ("import sys, ferry.cli, ferry.bench.command, ferry.bench.report, ferry.bench.plot, "
            "ferry.bench.tokens, ferry.bench.naive_server; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
