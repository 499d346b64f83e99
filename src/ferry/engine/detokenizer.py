"""Incremental, UTF-8-safe detokenization with stop strings.

Each step decodes only a small window of recent tokens (the vLLM / ``TextStreamer`` scheme):

    window:  [ ... context ... | ... unread ... ]
              ^prefix_offset    ^read_offset
    prefix_text = decode(window[prefix_offset:read_offset])
    new_text    = decode(window[prefix_offset:])
    delta       = new_text[len(prefix_text):]     (held back while it ends in U+FFFD)

Decoding the context again keeps tokenizer-dependent joins right (e.g. sentencepiece's leading
space); holding back a trailing U+FFFD keeps a multi-byte character split over tokens out of the
text until its last byte arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

from ferry.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens used as decoding context for the first generated tokens.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, step by step."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        *,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._text = ""
        self.stop_reason: str | None = None
        self.num_consumed = 0  # tokens of the last ``update`` read (see there)
        context = [t for t in prompt_token_ids if not self._skipped(t)][-_PROMPT_CONTEXT_TOKENS:]
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT):
            # NOTE: a prompt ending inside a multi-byte character would misalign the first delta.
            context, context_text = [], ""
        self._window: list[int] = context
        self._read_offset = len(context)  # window[:read_offset] is already in the text
        self._prefix_text = context_text  # decode(window[:read_offset])

    @property
    def output_text(self) -> str:
        """All text so far (cut at a matched stop string); never ends in an incomplete character."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append generated tokens; return the stop string that now matched, else None.

        After a stop string matched, further tokens are ignored: ``num_consumed`` tells how many
        of ``new_token_ids`` were read, up to and including the one that completed the stop
        string (several tokens arrive at once with speculative decoding; the ones after the stop
        are not part of the output).
        """
        self.num_consumed = 0
        for i, token_id in enumerate(new_token_ids):
            if self.stopped:
                return None
            self.num_consumed = i + 1
            if self._skipped(token_id):
                continue
            delta = self._append(token_id)
            if delta:
                matched = self._check_stop(len(self._text) - len(delta))
                if matched is not None:
                    return matched
        return None

    def emittable_text(self, finished: bool) -> str:
        """Text that may be streamed now: ``output_text`` minus a tail that could still grow into a
        stop string (held back until the sequence is finished or a stop matched)."""
        if finished or self.stopped or not self._stop:
            return self._text
        text = self._text
        for k in range(min(len(text), self._max_stop_len - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return text[:-k]
        return text

    # ----------------------------------------------------------------------------- internals

    def _skipped(self, token_id: int) -> bool:
        return self._skip_special and token_id in self._tokenizer.all_special_ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _append(self, token_id: int) -> str:
        """Add one token; return the newly decoded text ("" while it is incomplete)."""
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text):]
        self._text += delta
        # The just-read tokens become the next context; older ones are no longer needed.
        self._window = self._window[self._read_offset:]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def _check_stop(self, delta_start: int) -> str | None:
        """Find a stop string ending in the latest delta; cut the text there."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            # A new match must end inside the delta, so it starts at most len(s)-1 chars before it.
            idx = self._text.find(s, max(0, delta_start - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self._text = self._text[: idx + len(s) if self._include_stop else idx]
        self.stop_reason = s
        return s
