"""Compiling constraints for SmolLM2's tokenizer: grammar sources, the cache, errors naming the
field, matchers that follow the tokens, and bitmasks that allow exactly what the matcher accepts."""

from __future__ import annotations

import json

import pytest
import torch

from ferry.sampling_params import StructuredOutputsParams as S
from ferry.structured import (
    BitmaskFiller,
    GrammarCompiler,
    GrammarError,
    strict_json_schema,
)
from ferry.tokenizer import Tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def accepts(compiler: GrammarCompiler, params: S, text: str, tok: Tokenizer) -> bool:
    """The whole text is allowed and complete (EOS may follow)."""
    m = compiler.compile(params).matcher()
    return all(m.accept(t) for t in ids(tok, text)) and m.is_accepting


def test_strict_schema_closes_declared_objects_only() -> None:
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "object"},
        "c": {"type": "array", "items": {"$ref": "#/$defs/item"}},
        "d": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
        "e": {"allOf": [{"type": "object", "properties": {"p": {}}}]}},
        "$defs": {"item": {"type": "object", "properties": {"z": {}}}}}
    out = strict_json_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["b"]  # any object stays any object
    assert out["$defs"]["item"]["additionalProperties"] is False
    assert out["properties"]["d"]["additionalProperties"] is True  # what the schema says wins
    assert "additionalProperties" not in out["properties"]["e"]["allOf"][0]
    assert "additionalProperties" not in schema  # the caller's schema is untouched


@pytest.mark.parametrize("params, good, bad", [
    (S(json=PERSON), '{"name": "Bo", "age": 4}', '{"name": "Bo", "age": 4, "x": 1}'),
    (S(json=json.dumps(PERSON)), '{"name": "Bo", "age": 4}', '{"name": "Bo"}'),
    (S(json_object=True), '{"anything": [1, 2]}', '[1, 2]'),
    (S(regex=r"[0-9]{3}-[a-z]+"), "123-abc", "12-abc"),
    (S(choice=("yes", "no", 'say "hi"\n')), 'say "hi"\n', "maybe"),
    (S(grammar='root ::= "a" b\nb ::= "x" | "y"'), "ay", "az"),  # GBNF
    (S(grammar='start: "a" b\nb: "x" | "y"'), "ax", "ab"),  # Lark
], ids=["json", "json-text", "json-object", "regex", "choice", "gbnf", "lark"])
def test_outputs_match_their_constraint(compiler: GrammarCompiler, smol_tokenizer: Tokenizer,
                                        params: S, good: str, bad: str) -> None:
    assert accepts(compiler, params, good, smol_tokenizer)
    assert not accepts(compiler, params, bad, smol_tokenizer)


def test_cache_hits_by_value_and_evicts_the_least_recent(compiler: GrammarCompiler) -> None:
    a = compiler.compile(S(json=dict(PERSON)))
    assert compiler.compile(S(json=json.loads(json.dumps(PERSON)), source="guided_json")) is a
    assert compiler.num_compiled == 1
    for i in range(4):
        compiler.compile(S(regex=f"[0-9]{{{i + 1}}}"))
    assert len(compiler) == 4  # bounded
    assert compiler.cached(S(json=PERSON)) is None  # the oldest went first
    assert compiler.cached(S(regex="[0-9]{4}")) is not None


@pytest.mark.parametrize("params, param, words", [
    (S(json={"type": "strin"}), "structured_outputs.json", "strin"),
    (S(json="{not json", source="guided_json"), "guided_json", "not valid JSON"),
    (S(json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
       source="response_format.json_schema.schema"), "response_format.json_schema.schema", "nope"),
    (S(regex="((", source="guided_regex"), "guided_regex", "unclosed group"),
    (S(grammar="root ::= (", source="guided_grammar"), "guided_grammar", ""),
    (S(grammar="start: undefined_rule"), "structured_outputs.grammar", "undefined_rule"),
], ids=["schema-type", "schema-text", "schema-ref", "regex", "gbnf", "lark"])
def test_bad_constraints_are_value_errors_naming_the_field(
        compiler: GrammarCompiler, params: S, param: str, words: str) -> None:
    with pytest.raises(GrammarError) as info:
        compiler.compile(params)
    assert isinstance(info.value, ValueError)
    assert info.value.param == param
    assert str(info.value).startswith(param + ": ")
    assert words in str(info.value)
    assert "<state>" not in str(info.value)  # llguidance's debug dump stays out of the message
    assert compiler.cached(params) is None


def test_matcher_is_done_at_the_end_and_replays(compiler: GrammarCompiler,
                                                smol_tokenizer: Tokenizer) -> None:
    tokens = ids(smol_tokenizer, '{"name": "Bo", "age": 4}')
    m = compiler.compile(S(json=PERSON)).matcher()
    for t in tokens[:-1]:
        assert m.accept(t)
        assert not m.is_done
    assert m.accept(tokens[-1])
    assert m.is_done and m.num_tokens == len(tokens)
    assert m.replay(tokens[:3]) and m.num_tokens == 3 and not m.is_done
    assert not m.accept(ids(smol_tokenizer, "x")[0])  # forbidden: error state, only EOS follows
    assert m.is_error and m.is_done


def _allowed(bitmask: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if (int(bitmask[t // 32]) >> (t % 32)) & 1}


def test_bitmask_allows_what_the_matcher_accepts(compiler: GrammarCompiler,
                                                 smol_tokenizer: Tokenizer) -> None:
    vocab = smol_tokenizer.vocab_size
    choice = compiler.compile(S(choice=("yes", "no"))).matcher()
    digits = compiler.compile(S(regex="[0-9]+")).matcher()
    mask = BitmaskFiller().fill([None, choice, None, digits])
    assert mask is not None and mask.rows.tolist() == [1, 3] and mask.done_rows == frozenset()
    allowed_choice = _allowed(mask.bitmask[0], vocab)
    assert allowed_choice == {t for t in range(vocab) if _starts(compiler, ("yes", "no"), t)}
    allowed_digits = _allowed(mask.bitmask[1], vocab)
    texts = smol_tokenizer.convert_ids_to_tokens(sorted(allowed_digits))
    assert texts and all(t.isdigit() for t in texts)
    assert smol_tokenizer.eos_token_ids[0] not in allowed_digits  # "" does not match [0-9]+
    assert BitmaskFiller().fill([None, None]) is None
    # complete: only EOS is allowed, and the row is reported done
    for t in ids(smol_tokenizer, "yes"):
        choice.accept(t)
    mask = BitmaskFiller().fill([choice])
    assert mask is not None and mask.done_rows == frozenset({0})
    assert _allowed(mask.bitmask[0], vocab) == set(smol_tokenizer.eos_token_ids)


def _starts(compiler: GrammarCompiler, choices: tuple[str, ...], token: int) -> bool:
    m = compiler.compile(S(choice=choices)).matcher()
    return m.accept(token)


def test_token_mask_changes_only_its_rows(compiler: GrammarCompiler,
                                          smol_tokenizer: Tokenizer) -> None:
    vocab = smol_tokenizer.vocab_size
    mask = BitmaskFiller().fill([None, compiler.compile(S(choice=("yes", "no"))).matcher()])
    assert mask is not None
    logits = torch.randn(2, vocab + 7)  # a model vocabulary padded past the tokenizer's
    out = mask.apply(logits)
    assert torch.equal(out[0], logits[0])
    finite = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert set(finite) == _allowed(mask.bitmask[0], vocab)
    assert torch.equal(out[1, finite], logits[1, finite])
    assert not torch.isfinite(out[1, vocab:]).any()  # padding ids are never allowed
