"""Datasets, synthetic prompts, JSONL traces and seeded Poisson arrivals."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from ferry.bench.runner import LoadPoint
from ferry.bench.workload import (RequestSpec, WorkloadConfig, build_requests, load_builtin, load_jsonl,
                                  poisson_arrivals, synthetic_prompt)


def test_builtin_dataset_is_a_few_hundred_varied_chats() -> None:
    specs = load_builtin()
    assert 300 <= len(specs) <= 1000
    assert all(s.messages is not None and s.messages[-1]["role"] == "user" for s in specs)
    firsts = {s.messages[-1]["content"] for s in specs if s.messages}
    assert len(firsts) > 0.9 * len(specs)  # mostly distinct prompts
    assert len({s.max_tokens for s in specs}) >= 5
    assert any(len(s.messages or ()) > 2 for s in specs)  # some multi-turn conversations


def test_poisson_arrivals_follow_the_seed() -> None:
    a = poisson_arrivals(4.0, 200, seed=7)
    assert a == poisson_arrivals(4.0, 200, seed=7)
    assert a != poisson_arrivals(4.0, 200, seed=8)
    assert all(x < y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip([0.0] + a, a)]
    # 200 exponential gaps of mean 0.25 s: the sample mean is within ~5 standard errors (0.0177 each)
    assert statistics.fmean(gaps) == pytest.approx(0.25, abs=0.09)
    assert poisson_arrivals(math.inf, 3, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 3, seed=0)


def test_requests_are_seeded_and_cycle() -> None:
    cfg = WorkloadConfig(num_requests=10, seed=3)
    a = build_requests(cfg, 400)
    assert a == build_requests(cfg, 400)
    assert a != build_requests(WorkloadConfig(num_requests=10, seed=4), 400)
    n = len(load_builtin())
    assert a[n] == a[0]  # cycles once the dataset runs out


def test_max_tokens_override_and_completions_prompts() -> None:
    cfg = WorkloadConfig(max_tokens=7, endpoint="completions")
    specs = build_requests(cfg, 5)
    assert all(s.max_tokens == 7 and s.prompt for s in specs)
    assert specs[0].body("completions") == {"prompt": specs[0].prompt}


def test_synthetic_prompts_exact_with_tokenizer(hf_tokenizer_dir: Path) -> None:
    import random

    from ferry.bench.tokens import load_tokenizer

    tok = load_tokenizer(str(hf_tokenizer_dir))
    for n in (1, 16, 100):
        text = synthetic_prompt(n, random.Random(n), tok)
        assert len(tok.encode(text)) == n
    cfg = WorkloadConfig(dataset="synthetic", input_len=32, output_len=9)
    specs = build_requests(cfg, 3, tok)
    assert all(s.max_tokens == 9 and len(tok.encode(s.text())) == 32 for s in specs)
    assert specs[0].body("chat")["messages"][0]["role"] == "user"


def test_synthetic_without_tokenizer_uses_words() -> None:
    import random

    assert len(synthetic_prompt(50, random.Random(0)).split()) == 50


def test_jsonl_trace(tmp_path: Path) -> None:
    f = tmp_path / "trace.jsonl"
    f.write_text(json.dumps({"prompt": "Once upon a time", "max_tokens": 5}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    specs = load_jsonl(f)
    assert specs[0] == RequestSpec(max_tokens=5, prompt="Once upon a time")
    assert specs[1].messages == ({"role": "user", "content": "hi"},) and specs[1].max_tokens == 128
    assert specs[0].body("chat") == {"messages": [{"role": "user", "content": "Once upon a time"}]}
    with pytest.raises(ValueError, match="completions endpoint"):
        specs[1].body("completions")


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"max_tokens": 5}', "prompt"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    ("[1, 2]", "JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_jsonl(f)
    assert "bad.jsonl:2" in str(e.value)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        WorkloadConfig(endpoint="embeddings")
    with pytest.raises(ValueError, match="bound"):
        WorkloadConfig(num_requests=None, duration_s=None)
    with pytest.raises(ValueError, match="input_len"):
        WorkloadConfig(dataset="synthetic")
    with pytest.raises(ValueError, match="concurrency"):
        LoadPoint("concurrency", 1.5)
    with pytest.raises(ValueError, match="rate"):
        LoadPoint("rate", 0)
    assert LoadPoint("rate", math.inf).label == "rate=inf"
