"""DeltaTracker: exact per-choice deltas from cumulative outputs (chat and completions streaming)."""

from __future__ import annotations

import pytest

from ferry.outputs import CompletionOutput, Logprob, RequestOutput
from ferry.server.deltas import ChoiceDelta, DeltaTracker


def _lp(*ids: int) -> list[Logprob]:
    return [Logprob(t, -0.5) for t in ids]


def _out(*choices: tuple[int, str, list[int], str | None]) -> RequestOutput:
    """One cumulative output; a choice is (index, text so far, token ids so far, finish reason)."""
    return RequestOutput("r", None, [1, 2], [CompletionOutput(i, text, ids, finish, logprobs=_lp(*ids))
                                             for i, text, ids, finish in choices],
                         finished=all(f is not None for *_, f in choices))


def _d(index: int, text: str, tokens: list[int], offset: int, finish: str | None = None, *,
       first: bool = False, send: bool = True, prompt: int = 0) -> ChoiceDelta:
    return ChoiceDelta(index=index, prompt=prompt, text=text, logprobs=_lp(*tokens), token_offset=offset,
                       finish_reason=finish, first=first, send=send)


def test_single_choice_sends_only_what_is_new() -> None:
    t = DeltaTracker()
    assert t.update(0, _out((0, "He", [10], None))) == [_d(0, "He", [10], 0, first=True)]
    assert t.update(0, _out((0, "Hello", [10, 11], None))) == [_d(0, "llo", [11], 1)]
    assert t.update(0, _out((0, "Hello!", [10, 11, 12], "stop"))) == [_d(0, "!", [12], 2, "stop")]
    # a finished choice is skipped from then on
    assert t.update(0, _out((0, "Hello!", [10, 11, 12], "stop"))) == []


def test_n2_interleaved_with_a_finish_that_adds_no_text() -> None:
    t = DeltaTracker(n=2)
    assert t.update(0, _out((0, "a", [1], None), (1, "x", [5], None))) == [
        _d(0, "a", [1], 0, first=True), _d(1, "x", [5], 0, first=True)]
    # choice 1 has nothing new this time: no delta for it, and it keeps its offsets
    assert t.update(0, _out((0, "ab", [1, 2], None), (1, "x", [5], None))) == [_d(0, "b", [2], 1)]
    # choice 0 finishes with no new text (e.g. EOS): an empty delta that carries the finish
    assert t.update(0, _out((0, "ab", [1, 2, 3], "stop"), (1, "xy", [5, 6], None))) == [
        _d(0, "", [3], 2, "stop"), _d(1, "y", [6], 1)]
    assert t.update(0, _out((0, "ab", [1, 2, 3], "stop"), (1, "xyz", [5, 6, 7], "length"))) == [
        _d(1, "z", [7], 2, "length")]
    assert t.update(0, _out((0, "ab", [1, 2, 3], "stop"), (1, "xyz", [5, 6, 7], "length"))) == []


def test_held_back_text_keeps_its_logprobs_for_the_next_delta() -> None:
    t = DeltaTracker()
    # the first token's text is held back (half a UTF-8 character, a possible stop string):
    # reported as the choice's first delta, not to send, and the tracker does not move
    assert t.update(0, _out((0, "", [7], None))) == [_d(0, "", [7], 0, first=True, send=False)]
    assert t.update(0, _out((0, "", [7, 8], None))) == []
    assert t.update(0, _out((0, "é", [7, 8, 9], None))) == [_d(0, "é", [7, 8, 9], 0)]


def test_always_send_first_sends_an_empty_first_delta() -> None:
    t = DeltaTracker(always_send_first=True)  # completions with echo: the first chunk carries the prompt
    assert t.update(0, _out((0, "", [7], None))) == [_d(0, "", [7], 0, first=True)]
    assert t.update(0, _out((0, "", [7, 8], None))) == []
    assert t.update(0, _out((0, "é", [7, 8, 9], "length"))) == [_d(0, "é", [8, 9], 1, "length")]


def test_several_prompts_number_choices_prompt_times_n() -> None:
    t = DeltaTracker(n=2)
    assert t.update(1, _out((0, "p", [3], None), (1, "q", [4], "stop"))) == [
        _d(2, "p", [3], 0, first=True, prompt=1), _d(3, "q", [4], 0, "stop", first=True, prompt=1)]
    assert t.update(0, _out((0, "a", [1], None), (1, "", [], None))) == [
        _d(0, "a", [1], 0, first=True), _d(1, "", [], 0, first=True, send=False)]
    assert t.update(1, _out((0, "pp", [3, 3], "stop"), (1, "q", [4], "stop"))) == [
        _d(2, "p", [3], 1, "stop", prompt=1)]


def test_without_logprobs_the_slices_are_empty() -> None:
    t = DeltaTracker()
    out = RequestOutput("r", None, [1], [CompletionOutput(0, "hi", [5, 6])], finished=False)
    assert t.update(0, out) == [ChoiceDelta(index=0, prompt=0, text="hi", logprobs=[], token_offset=0,
                                            finish_reason=None, first=True, send=True)]


def test_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n must be"):
        DeltaTracker(n=0)
