"""Incremental detokenization: equals the full decode, UTF-8 safe, stop strings across tokens."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.loader.gguf import open_gguf, read_metadata
from ferry.tokenizer import Tokenizer

TEXT = ("The quick brown fox 🦊 jumps over the lazy dog. 日本語のテキスト、中文。 "
        "Emoji: 🎉🚀👩‍👩‍👧‍👦 — naïve café.\n\ndef f(x):\n    return x ** 2\n")


@pytest.fixture(scope="module")
def tok(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(smollm2_path)))


class CountingTokenizer:
    """Wraps a Tokenizer and records how many ids each decode call saw."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.decode_lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunk_sizes: Sequence[int] = (1,),
           ) -> tuple[list[str], str | None]:
    """Feed ids in chunks; return every emitted text and the stop string (if any)."""
    emitted: list[str] = []
    pos, i = 0, 0
    while pos < len(ids):
        n = chunk_sizes[i % len(chunk_sizes)]
        i += 1
        matched = detok.update(ids[pos:pos + n])
        pos += n
        emitted.append(detok.emittable_text(finished=False))
        if matched is not None:
            return emitted, matched
    return emitted, None


def assert_prefixes(emitted: list[str], final: str) -> None:
    for text in emitted:
        assert final.startswith(text)
        assert "\ufffd" not in text or "\ufffd" in final


def test_streaming_real_text_equals_full_decode(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok)
    emitted, matched = stream(detok, ids)
    assert matched is None
    assert detok.output_text == tok.decode(ids) == TEXT
    assert detok.emittable_text(finished=True) == TEXT
    assert_prefixes(emitted, TEXT)
    assert all("\ufffd" not in e for e in emitted)
    # Emitted text only ever grows.
    assert all(len(a) <= len(b) for a, b in zip(emitted, emitted[1:]))


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_random_ids_equals_full_decode(tok: Tokenizer, seed: int, skip_special_tokens: bool) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    # Mix arbitrary vocabulary ids with single-byte tokens (ids of the 256 byte symbols sit low in
    # the vocab) so invalid and split UTF-8 sequences are common, plus a few special tokens.
    ids = [rng.choice([rng.randrange(tok.vocab_size), rng.randrange(17, 300), rng.randrange(0, 17)])
           for _ in range(n)]
    ids.append(tok.encode("end")[0])  # finish on a complete character
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    chunks = [rng.randint(1, 4) for _ in range(5)]
    emitted, _ = stream(detok, ids, chunks)
    assert detok.output_text == full
    assert_prefixes(emitted, full)
    for e in emitted:  # a U+FFFD shown early is one the full text has at that place too
        assert not e.endswith("\ufffd")


def test_random_ids_unfinished_tail_is_withheld(tok: Tokenizer) -> None:
    emoji = tok.encode("🎉")
    assert len(emoji) > 1, "the emoji must span several tokens for this test"
    detok = IncrementalDetokenizer(tok)
    detok.update(tok.encode("ok ") + emoji[:-1])
    assert detok.output_text == "ok "
    detok.update(emoji[-1:])
    assert detok.output_text == "ok 🎉"


@pytest.mark.parametrize("text", ["🎉", "日本語", "👩‍👩‍👧‍👦", "a🦊b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_multibyte_split_never_shows_replacement(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "expected a character split over tokens"
    detok = IncrementalDetokenizer(tok)
    emitted, _ = stream(detok, ids)
    assert all("\ufffd" not in e for e in emitted)
    assert_prefixes(emitted, text)
    assert detok.output_text == text


def test_decodes_a_bounded_window(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT * 20)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, prompt_token_ids=tok.encode("Prompt here"))  # type: ignore[arg-type]
    stream(detok, ids)
    assert detok.output_text == TEXT * 20
    assert len(ids) > 500
    assert max(counting.decode_lengths) <= 12  # never the whole sequence


def test_prompt_context_does_not_change_bytelevel_text(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>user\nSay hi 日本<|im_end|>\n")
    ids = tok.encode(" Hello there, friend.")
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
    detok.update(ids)
    assert detok.output_text == " Hello there, friend."


def _tokens_of(tok: Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    return ids


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    text = "Hello world, this is the end of it."
    ids = _tokens_of(tok, text)
    stop = "lo wor"  # crosses the "Hello" / " world" boundary
    assert all(stop not in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, stop=[stop])
    emitted, matched = stream(detok, ids)
    assert matched == stop and detok.stop_reason == stop
    assert detok.output_text == "Hel"
    assert_prefixes(emitted, "Hel")
    # Further tokens are ignored once stopped.
    assert detok.update(tok.encode(" more")) is None
    assert detok.output_text == "Hel"


def test_stop_string_included(tok: Tokenizer) -> None:
    ids = _tokens_of(tok, "Answer: 42\n### Next question")
    detok = IncrementalDetokenizer(tok, stop=["###"], include_stop_str_in_output=True)
    emitted, matched = stream(detok, ids)
    assert matched == "###"
    assert detok.output_text == "Answer: 42\n###"
    assert_prefixes(emitted, detok.output_text)


def test_earliest_stop_wins_in_one_update(tok: Tokenizer) -> None:
    ids = _tokens_of(tok, "one two three four")
    detok = IncrementalDetokenizer(tok, stop=["four", "two", "thr"])
    assert detok.update(ids) == "two"
    assert detok.output_text == "one "


def test_emittable_text_withholds_possible_stop_prefix(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["lo wor", "<END>"])
    detok.update(_tokens_of(tok, "Hello"))
    assert detok.output_text == "Hello"
    assert detok.emittable_text(finished=False) == "Hel"  # "lo" may start "lo wor"
    assert detok.emittable_text(finished=True) == "Hello"
    detok.update(_tokens_of(tok, " there <"))
    assert detok.emittable_text(finished=False) == "Hello there "
    assert detok.update(_tokens_of(tok, "END>")) == "<END>"
    assert detok.emittable_text(finished=False) == detok.output_text == "Hello there "


def test_stop_across_multibyte_and_special(tok: Tokenizer) -> None:
    ids = tok.encode("Result 🎉 done") + [2] + tok.encode(" tail")
    detok = IncrementalDetokenizer(tok, stop=["🎉 d"])
    emitted, matched = stream(detok, ids)
    assert matched == "🎉 d"
    assert detok.output_text == "Result "
    assert all("\ufffd" not in e for e in emitted)
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False, stop=["> tail"])
    keep.update(ids)
    assert keep.output_text == "Result 🎉 done<|im_end|"
