"""The offline API on the real SmolLM2: sampling behaviour, stops, n, logprobs, abort, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.batch.outputs import ScheduledRequest, SchedulerOutput
from ferry.batch.request import Request
from ferry.loader import ModelFormatError, ModelNotFoundError

PROMPT = "Write a short poem about autumn leaves."


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> LLM:
    return LLM("smollm2-135m-instruct", kv_cache_memory=64 << 20, max_model_len=512)


@pytest.fixture(scope="module")
def chat_prompt(llm: LLM) -> dict:
    return {"prompt_token_ids": llm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])}


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0


def test_chat_answers_with_real_text(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.prompt_token_ids[:1] == llm.tokenizer.encode("<|im_start|>", False)


def test_token_id_prompts_equal_text_prompts(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=8)
    ids = llm.tokenizer.encode(PROMPT)
    by_text, by_ids = llm.generate([PROMPT, {"prompt_token_ids": ids}], params)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_ids.prompt_token_ids == ids


def test_same_seed_same_text_regardless_of_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    other = SamplingParams(temperature=1.0, max_tokens=24)
    alone = llm.generate(PROMPT, seeded)[0].outputs[0].text
    batched = llm.generate(["Hello there", PROMPT, "Count to ten"], [other, seeded, other])
    assert batched[1].outputs[0].text == alone
    different = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=24, seed=99))
    assert different[0].outputs[0].text != alone


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))[0]
    top1 = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=20))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_strings_cut_across_token_boundaries(llm: LLM, chat_prompt: dict) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate(chat_prompt, params)[0].outputs[0]
    tok = llm.tokenizer
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start:start + max(4, len(pieces[2]) + 2)]
    assert len(stop) >= 2
    cut = llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
    first = full.text.index(stop)
    assert cut.outputs[0].text == full.text[:first]
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    kept = llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == full.text[:first + len(stop)]
    assert_no_leak(llm)


def test_stop_token_ids_and_max_tokens(llm: LLM, chat_prompt: dict) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate(chat_prompt, params)[0].outputs[0]
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=40,
                                              stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    short = llm.generate(chat_prompt, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


def test_n_gives_distinct_choices_sharing_the_prompt(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({c.text for c in out.outputs}) > 1
    assert all(c.finish_reason in ("stop", "length") for c in out.outputs)
    assert_no_leak(llm)


def test_logprobs_are_real_log_probabilities(llm: LLM) -> None:
    params = SamplingParams(temperature=0.7, max_tokens=6, logprobs=5, seed=3)
    out = llm.generate(PROMPT, params)[0]
    choice = out.outputs[0]
    assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
    # Recompute the full-vocabulary distribution at each generated position.
    ids = out.prompt_token_ids + choice.token_ids
    core = llm.engine.core
    req = Request("score", ids, SamplingParams(), (), 1)
    assert core.kv.allocate_slots(req, len(ids))
    try:
        logits = core.runner.all_logits(SchedulerOutput([
            ScheduledRequest(req, len(ids), core.kv.block_ids(req.request_id))]))
    finally:
        core.kv.free(req)
    full = torch.log_softmax(logits.double(), dim=-1)
    n_prompt = len(out.prompt_token_ids)
    for i, lp in enumerate(choice.logprobs):
        row = full[n_prompt - 1 + i]
        assert abs(row.exp().sum().item() - 1.0) < 1e-4
        assert lp.token_id == choice.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 5
        top_values = list(lp.top.values())
        assert top_values == sorted(top_values, reverse=True)
        best = torch.topk(row, 5)
        assert list(lp.top) == best.indices.tolist()
    assert_no_leak(llm)


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
    llm.abort("to-abort")
    assert_no_leak(llm)
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": []}, SamplingParams(), "empty"),
        ({"prompt_token_ids": [1, 10**9]}, SamplingParams(), "token ids"),
        ("word " * 600, SamplingParams(), "context"),
        ("hello", SamplingParams(max_tokens=512), "context"),
    ],
)
def test_bad_prompts_raise_and_leak_nothing(llm: LLM, prompt: object, params: SamplingParams,
                                            match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine prompt", prompt], params)  # type: ignore[list-item]
    assert_no_leak(llm)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
     ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p")],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_says_what_is_accepted() -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        LLM("no-such-model")


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path, smollm2_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path.read_bytes()[: 1 << 20])
    with pytest.raises(ModelFormatError):
        LLM(str(truncated))
