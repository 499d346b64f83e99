"""The n-gram proposer and the speculative config (LLM's dict, serve's flags: exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ferry.config import SpeculativeConfig
from ferry.server.flags import add_arguments, configs_from_args
from ferry.spec import NgramProposer


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    p = NgramProposer(3, min_n=1, max_n=3)
    # "1 2 3" occurs at 0 (then 4 5 6) and at 6 (then 9): the latest, 9 ..., wins
    assert p.propose([1, 2, 3, 4, 5, 6, 1, 2, 3, 9, 8, 7, 1, 2, 3]) == [9, 8, 7]
    # the longest n first: "7 3" matches once (followed by 5), "3" alone would give 1
    assert p.propose([7, 3, 5, 3, 1, 7, 3]) == [5, 3, 1]
    assert p.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert p.propose([4, 4]) == [4]  # what is there, fewer than k
    assert p.propose([1, 2, 1], max_tokens=0) == []
    assert p.propose([1, 2, 1, 2, 1], max_tokens=1) == [2]


def test_ngram_min_n_bounds_the_match() -> None:
    p = NgramProposer(2, min_n=2, max_n=2)
    assert p.propose([5, 1, 9, 1]) == []  # only a 1-gram repeats
    assert p.propose([5, 1, 9, 5, 1]) == [9, 5]


def test_speculative_config_dict_as_vllm_reads_it() -> None:
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4,
                                     "prompt_lookup_max": 4})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == (
        "ngram", 4, 4, 4)
    assert SpeculativeConfig.from_dict({"model": "m"}).method == "draft_model"
    limited = SpeculativeConfig.from_dict({"method": "ngram", "disable_by_batch_size": 8})
    assert limited.enabled_for(7) and not limited.enabled_for(8)
    assert SpeculativeConfig.from_dict({"disable_by_batch_size": None}).enabled_for(10_000)
    for bad, words in (({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0}, "[1, 16]"),
                       ({"method": "draft_model"}, "needs a model"), ({"foo": 1}, "unknown key"),
                       ({"prompt_lookup_max": 1, "prompt_lookup_min": 3}, "prompt_lookup_max"),
                       ({"num_speculative_tokens": "4"}, "integer"),
                       ({"disable_by_batch_size": 1}, ">= 2"),
                       ({"disable_by_batch_size": "8"}, "integer")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            SpeculativeConfig.from_dict(bad)


def test_llm_refuses_a_bad_config_before_loading() -> None:
    from ferry import LLM

    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 99})


def parse(*argv: str):  # type: ignore[no-untyped-def]
    import argparse

    parser = argparse.ArgumentParser(prog="ferry serve")
    add_arguments(parser, "serve")
    return configs_from_args(parser.parse_args(list(argv)))[0].speculative


def test_serve_flags_json_and_short_forms() -> None:
    assert parse() is None
    c = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, '
                                      '"prompt_lookup_max": 4}')
    assert c == SpeculativeConfig("ngram", 4, 4, 4)
    c = parse("--speculative-model", "smollm2-135m-instruct", "--num-speculative-tokens", "3")
    assert c == SpeculativeConfig("draft_model", 3, model="smollm2-135m-instruct")
    c = parse("--speculative-config", '{"method": "ngram"}', "--num-speculative-tokens", "2")
    assert c is not None and c.num_speculative_tokens == 2
    for argv, words in ((("--speculative-config", "{nope"), "not valid JSON"),
                        (("--speculative-config", "[1]"), "JSON object"),
                        (("--num-speculative-tokens", "3"), "needs --speculative-model"),
                        (("--speculative-config", '{"num_speculative_tokens": 2}',
                          "--num-speculative-tokens", "3"), "disagrees")):
        with pytest.raises(ValueError, match=words):
            parse(*argv)


def test_serve_exits_2_with_one_line_on_a_bad_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "serve", "--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": 40}'],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry serve: --speculative-config")
    assert "num_speculative_tokens" in lines[0]
