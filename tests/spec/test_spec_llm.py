"""Speculative decoding end to end on the real SmolLM2 through ``LLM``: greedy output identical to
plain decoding (n-gram lookup, the model as its own draft, a tiny random draft that is mostly
wrong), the same for stops, limits, penalties and logprobs inside accepted runs; seeded sampling
reproducible; prefix caching, aborts and preemption leave the pool whole; counters move."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry import LLM, SamplingParams
from ferry.batch.request import RequestStatus
from ferry.engine.core import SpecDecodeStats

pytestmark = pytest.mark.slow

MESSAGES = [
    "Repeat this list exactly, twice: apple, banana, cherry, date, elderberry, fig, grape.",
    ("Rewrite this Python code with the variable x renamed to value:\n"
     "def area(x):\n    if x < 0:\n        raise ValueError(x)\n    return 3.14159 * x * x\n"),
    "Copy this sentence three times: The quick brown fox jumps over the lazy dog.",
    "Write a short poem about autumn leaves.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 1}
COMMON = {"kv_cache_memory": 64 << 20, "max_model_len": 1024}


@pytest.fixture(scope="module")
def base(smollm2_path: Path) -> LLM:
    return LLM(**COMMON)


@pytest.fixture(scope="module")
def ngram(smollm2_path: Path) -> LLM:
    return LLM(**COMMON, speculative_config=NGRAM)


@pytest.fixture(scope="module")
def self_draft(smollm2_path: Path) -> LLM:
    return LLM(**COMMON, speculative_config={"method": "draft_model", "num_speculative_tokens": 3,
                                             "model": "smollm2-135m-instruct"})


@pytest.fixture(scope="module")
def prompts(base: LLM) -> list[dict]:
    return [{"prompt_token_ids": base.tokenizer.encode_chat([{"role": "user", "content": m}])}
            for m in MESSAGES]


def tokens(llm: LLM, prompts: list[dict], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0


def spec_stats(llm: LLM) -> SpecDecodeStats:
    stats = llm.engine.stats().spec_decode
    assert stats is not None
    return stats


GREEDY = SamplingParams(temperature=0.0, max_tokens=96)


def test_ngram_greedy_is_token_for_token_plain_decoding(base: LLM, ngram: LLM,
                                                        prompts: list[dict]) -> None:
    before = spec_stats(ngram)
    expected = tokens(base, prompts, GREEDY)
    assert tokens(ngram, prompts, GREEDY) == expected  # all four in one batch
    for p, want in zip(prompts, expected):  # and one at a time
        assert tokens(ngram, [p], GREEDY) == [want]
    after = spec_stats(ngram)
    assert after.num_drafts > before.num_drafts
    assert after.num_accepted_tokens > before.num_accepted_tokens
    assert after.accepted_per_position[0] > before.accepted_per_position[0]
    assert 0 < after.acceptance_rate <= 1 and after.mean_acceptance_length > 1
    assert_no_leak(ngram)


def test_self_draft_greedy_is_plain_decoding_and_accepts_nearly_all(
        base: LLM, self_draft: LLM, prompts: list[dict]) -> None:
    assert tokens(self_draft, prompts, GREEDY) == tokens(base, prompts, GREEDY)
    stats = spec_stats(self_draft)
    # the same weights propose what the target samples, up to float summation order
    assert stats.acceptance_rate > 0.9 and stats.num_drafts > 0
    assert_no_leak(self_draft)


def test_a_random_tiny_draft_is_mostly_wrong_yet_the_output_is_exact(
        base: LLM, prompts: list[dict], tiny_llama_dir: Path) -> None:
    llm = LLM(**COMMON, speculative_config={"model": str(tiny_llama_dir),
                                            "num_speculative_tokens": 2})
    assert tokens(llm, prompts, GREEDY) == tokens(base, prompts, GREEDY)
    stats = spec_stats(llm)
    assert stats.num_draft_tokens > 0 and stats.acceptance_rate < 0.5
    assert_no_leak(llm)


def test_disable_by_batch_size_turns_the_draft_off_for_big_batches(
        base: LLM, prompts: list[dict], tiny_llama_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(**COMMON, speculative_config={"model": str(tiny_llama_dir),
                                            "num_speculative_tokens": 2,
                                            "disable_by_batch_size": 2})
    runner = llm.engine.core.runner
    proposing_calls: list[int] = []
    propose = runner._propose
    monkeypatch.setattr(runner, "_propose",
                        lambda sampling, sampled: proposing_calls.append(len(sampling))
                        or propose(sampling, sampled))
    # four streams that end together: every step runs four requests, so nothing is proposed
    even = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert tokens(llm, prompts, even) == tokens(base, prompts, even)
    assert spec_stats(llm).num_drafts == 0 and proposing_calls == []
    # one stream alone speculates again, and stays exact
    assert tokens(llm, prompts[:1], GREEDY) == tokens(base, prompts[:1], GREEDY)
    assert spec_stats(llm).num_drafts > 0 and set(proposing_calls) == {1}
    assert_no_leak(llm)


def test_a_draft_of_another_vocabulary_is_refused(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path), safe_serialization=True)
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens but the target's has 49152"):
        LLM(**COMMON, speculative_config={"model": str(tmp_path)})


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=96, stop=["cherry, date"]),
    SamplingParams(temperature=0.0, max_tokens=96, stop=["fig"], include_stop_str_in_output=True),
    SamplingParams(temperature=0.0, max_tokens=23),
    SamplingParams(temperature=0.0, max_tokens=96, stop_token_ids=[28]),  # ","
    SamplingParams(temperature=0.0, max_tokens=60, min_tokens=40),
    SamplingParams(temperature=0.0, max_tokens=60, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, max_tokens=60, frequency_penalty=0.5, presence_penalty=0.3),
], ids=["stop", "stop-included", "max-tokens", "stop-token-id", "min-tokens", "repetition",
        "frequency"])
def test_stops_limits_and_penalties_inside_accepted_runs(
        base: LLM, ngram: LLM, prompts: list[dict], params: SamplingParams) -> None:
    want = base.generate(prompts, params)
    got = ngram.generate(prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (
            w.outputs[0].finish_reason, w.outputs[0].stop_reason)
    assert_no_leak(ngram)


def test_a_stop_string_inside_a_run_of_accepted_tokens(base: LLM, ngram: LLM,
                                                       prompts: list[dict]) -> None:
    # The answer copies the prompt's list, in long accepted runs: a stop string inside one must
    # cut the output where one-token steps would have, dropping the run's later tokens.
    engine = ngram.engine
    cut_inside_a_run = 0
    for i, stop in enumerate(["banana", "cherry", "date", "elderberry", "fig"]):
        params = SamplingParams(temperature=0.0, max_tokens=96, stop=[stop])
        want = base.generate(prompts[:1], params)[0].outputs[0]
        engine.add_request(f"stop-{i}", prompts[0], params)
        core_tokens = 0
        done = None
        while engine.has_unfinished():
            core_out = engine.core.step()
            core_tokens += sum(len(c.new_token_ids) for c in core_out)
            outs, hits = engine.processor.process(core_out)
            for hit in hits:
                engine.core.finish_request(hit.child_id, RequestStatus.FINISHED_STOPPED, hit.stop)
            for o in outs:
                if o.finished:
                    done = o
        assert done is not None
        got = done.outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text, want.token_ids, "stop", stop)
        # the final step's run carried tokens past the one that completed the stop string
        if core_tokens > len(got.token_ids):
            cut_inside_a_run += 1
    assert cut_inside_a_run >= 1
    assert_no_leak(ngram)


def test_logprobs_match_plain_decoding(base: LLM, ngram: LLM, prompts: list[dict]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=48, logprobs=2)
    for w, g in zip(base.generate(prompts[:2], params), ngram.generate(prompts[:2], params)):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs is not None and w.outputs[0].logprobs is not None
        assert len(g.outputs[0].logprobs) == len(g.outputs[0].token_ids)
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lg.token_id == lw.token_id and set(lg.top) == set(lw.top)
            assert lg.logprob == pytest.approx(lw.logprob, abs=1e-3)


def test_seeded_sampling_is_reproducible(ngram: LLM, self_draft: LLM, prompts: list[dict]) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=1234)
    for llm in (ngram, self_draft):
        first = tokens(llm, prompts, params)
        assert tokens(llm, prompts, params) == first
        assert [tokens(llm, [p], params)[0] for p in prompts] == first  # whatever the batch
        assert any(a != b for a, b in zip(first, tokens(llm, prompts, SamplingParams(
            temperature=0.8, top_p=0.95, max_tokens=24, seed=99))))
        n2 = llm.generate(prompts[:1], SamplingParams(temperature=0.8, max_tokens=16, n=2,
                                                      seed=7))[0]
        assert len(n2.outputs) == 2 and all(o.token_ids for o in n2.outputs)
        assert_no_leak(llm)


def test_prefix_cache_hit_with_speculation(ngram: LLM, base: LLM, prompts: list[dict]) -> None:
    want = tokens(base, prompts[1:2], GREEDY)
    first = ngram.generate(prompts[1:2], GREEDY)[0]
    second = ngram.generate(prompts[1:2], GREEDY)[0]
    assert [first.outputs[0].token_ids] == [second.outputs[0].token_ids] == want
    assert second.num_cached_tokens > 0
    # a prompt that extends the first answer hits its blocks, written by verified steps
    extended = {"prompt_token_ids": prompts[1]["prompt_token_ids"] + first.outputs[0].token_ids}
    hit = ngram.generate([extended], SamplingParams(temperature=0.0, max_tokens=16))[0]
    assert hit.num_cached_tokens >= 16 * ((len(prompts[1]["prompt_token_ids"]) + 8) // 16)
    assert hit.outputs[0].token_ids == tokens(base, [extended], SamplingParams(
        temperature=0.0, max_tokens=16))[0]
    assert_no_leak(ngram)


def test_abort_mid_run_leaks_no_block(ngram: LLM, prompts: list[dict]) -> None:
    engine = ngram.engine
    before = spec_stats(ngram).num_drafts
    engine.add_request("to-abort", prompts[0], SamplingParams(max_tokens=200, ignore_eos=True,
                                                              temperature=0.0))
    for _ in range(12):
        engine.step()
    assert spec_stats(ngram).num_drafts > before  # it was speculating
    assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
    ngram.abort("to-abort")
    assert_no_leak(ngram)
    assert not engine.has_unfinished()


def test_preemption_with_speculation(base: LLM, prompts: list[dict]) -> None:
    # 12 blocks of 16 tokens: four ~60-token prompts growing by 96 tokens cannot all stay
    small = LLM(**{**COMMON, "kv_cache_memory": None}, num_gpu_blocks_override=24,
                speculative_config=NGRAM)
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    assert tokens(small, prompts, params) == tokens(base, prompts, params)
    assert small.engine.stats().num_preemptions_total > 0
    assert spec_stats(small).num_accepted_tokens > 0
    assert_no_leak(small)
