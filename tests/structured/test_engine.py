"""Constrained decoding in the engine on the real SmolLM2 (greedy): outputs parse and validate,
constrained and free requests share batches without changing each other's tokens, and n > 1,
preemption and prefix-cache hits keep every matcher in step with its sequence."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ferry import LLM, SamplingParams
from ferry.engine.async_engine import AsyncEngine
from ferry.sampling_params import StructuredOutputsParams as S

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
    "required": ["name", "age", "address"]}
FRUITS = {"type": "object", "properties": {"fruits": {
    "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "color": {"type": "string", "enum": ["red", "green", "yellow", "orange", "purple"]}},
        "required": ["name", "color"]}}}, "required": ["fruits"]}
MOVIE = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "rating": {"type": "number", "minimum": 0, "maximum": 10},
    "recommended": {"type": "boolean"}}, "required": ["title", "rating", "recommended"]}
CASES = [("Describe a fictional person as JSON.", PERSON),
         ("List three fruits and their colors as JSON.", FRUITS),
         ("Rate the movie Titanic as JSON.", MOVIE)]
FREE = "Write one sentence about the sea."


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def greedy(structured: S | None = None, max_tokens: int = 120, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=structured, **kw)


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> LLM:
    return LLM(str(smollm2_path), max_model_len=1024)


def test_json_schema_outputs_parse_and_validate(llm: LLM) -> None:
    outs = llm.chat([chat(p) for p, _ in CASES], greedy(None))  # warm-up: free answers differ
    outs = [llm.chat(chat(p), greedy(S(json=schema)))[0] for p, schema in CASES]
    for out, (_, schema) in zip(outs, CASES):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
        assert completion.token_ids[-1] in llm.engine.eos_token_ids


def test_json_object_regex_choice_and_grammars(llm: LLM) -> None:
    q = chat("What is the capital of France? Answer in one word.")
    regex = r"The capital is [A-Z][a-z]{1,15}\."
    gbnf = 'root ::= num " " op " " num\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
    lark = 'start: "The answer is " WORD "."\nWORD: /[A-Za-z]{1,12}/'
    outs = llm.generate(
        [{"prompt_token_ids": llm.tokenizer.encode_chat(c)} for c in
         (chat("Give the name and age of a dog as a JSON object."), q, q, chat("Write an arithmetic sum."), q)],
        [greedy(S(json_object=True), max_tokens=200), greedy(S(regex=regex)),
         greedy(S(choice=("Paris", "London", "Rome"))), greedy(S(grammar=gbnf)),
         greedy(S(grammar=lark))])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert isinstance(json.loads(texts[0]), dict)
    assert re.fullmatch(regex, texts[1])
    assert texts[2] in ("Paris", "London", "Rome")
    assert re.fullmatch(r"[1-9][0-9]? [-+*] [1-9][0-9]?", texts[3])
    assert re.fullmatch(r"The answer is [A-Za-z]{1,12}\.", texts[4])


def test_mixed_batch_gives_each_request_its_tokens_alone(llm: LLM) -> None:
    prompts = [chat(p) for p, _ in CASES] + [chat(FREE), chat("Name a color.")]
    params = [greedy(S(json=s), max_tokens=60) for _, s in CASES] + [greedy(max_tokens=30)] * 2
    alone = [llm.chat(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": llm.tokenizer.encode_chat(p)} for p in prompts], params)]
    assert together == alone


def test_n_choices_each_walk_the_grammar(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=120,
                            structured_outputs=S(json=MOVIE))
    out = llm.chat(chat(CASES[2][0]), params)[0]
    assert len(out.outputs) == 4
    texts = {c.text for c in out.outputs}
    assert len(texts) > 1  # the choices differ, yet each is valid
    for c in out.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), MOVIE)
        else:
            assert c.finish_reason == "length"


def test_max_tokens_cut_is_length_and_grammar_wins_over_min_tokens_and_ignore_eos(llm: LLM) -> None:
    q = chat("What is the capital of France?")
    cut = llm.chat(chat(CASES[0][0]), greedy(S(json=PERSON), max_tokens=5))[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5
    for extra in ({"min_tokens": 50}, {"ignore_eos": True}):
        done = llm.chat(q, greedy(S(choice=("Paris", "Rome")), max_tokens=60, **extra))[0]
        assert done.outputs[0].finish_reason == "stop"
        assert done.outputs[0].text in ("Paris", "Rome")


def test_preemption_and_prefix_cache_keep_outputs(smollm2_path: Path, llm: LLM) -> None:
    prompts = [f"Return a JSON object describing {x}: " for x in ("a cat", "a car", "a city")]
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=S(json=MOVIE))
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    tiny = LLM(str(smollm2_path), block_size=4, num_gpu_blocks_override=20, max_model_len=80)
    engine = tiny.engine
    states = [engine.make_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for s in states:
        engine.add(s)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        for s in states:  # every matcher has taken exactly its sequence's tokens
            for child in s.children:
                assert child.grammar is not None
                assert child.grammar.num_tokens == child.num_output_tokens
    assert engine.stats().num_preemptions_total > 0
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(3)] == expected
    # a prefix-cache hit for the same prompts: same tokens again
    again = tiny.generate(prompts[:1], params)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == expected[0]


async def test_async_engine_compiles_off_the_event_loop_and_the_engine_thread(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = AsyncEngine(llm.engine)
    engine.start()
    compiled_on: list[threading.Thread] = []
    real = llm.engine.compile_grammar

    def spy(structured: S) -> object:
        compiled_on.append(threading.current_thread())
        return real(structured)

    monkeypatch.setattr(llm.engine, "compile_grammar", spy)
    params = greedy(S(regex="[0-9]{2} apples"), max_tokens=8)  # new: a cache miss
    try:
        for rid in ("a", "b"):
            outs = [o async for o in engine.generate("How many apples? ", params, rid)]
            assert re.fullmatch("[0-9]{2} apples", outs[-1].outputs[0].text)
        with pytest.raises(ValueError, match="structured_outputs.regex"):
            async for _ in engine.generate("x", greedy(S(regex="[0-9")), "c"):
                pass
    finally:
        engine.shutdown()
    assert len(compiled_on) == 2  # "b" found the grammar in the cache; "c" failed to compile
    assert all(t is not threading.current_thread() and t.name != "ferry-engine"
               for t in compiled_on)
