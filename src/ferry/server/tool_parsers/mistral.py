"""``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral 7B v0.3, Nemo,
Small), or the newer ``[TOOL_CALLS]name[ARGS]{...}``. ``[TOOL_CALLS]`` is a special token, so the
output is detokenized with special tokens kept."""

from __future__ import annotations

import json
import re

from ferry.server.tool_parsers.base import (
    CallNumbering,
    arguments_text,
    balanced_end,
    mistral_call_id,
)
from ferry.server.tool_parsers.hermes import parse_call
from ferry.server.tool_parsers.markup import MarkupParser, Parsed

_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")
_NAMED_PREFIX = re.compile(r"\s*[A-Za-z0-9_.\-]*(\[(A(R(G(S)?)?)?)?)?")


class MistralParser(MarkupParser):
    start = "[TOOL_CALLS]"
    special_tokens = True

    def __init__(self) -> None:
        super().__init__(CallNumbering(make_id=mistral_call_id))

    def _read(self, text: str) -> Parsed | None:
        body = text.lstrip()
        if not body:
            return None
        skipped = len(text) - len(body)
        if body[0] == "[":
            end = balanced_end(body, 0)
            if end is None:
                return None
            return Parsed(_array_calls(body[:end]), skipped + end)
        named = _NAMED.match(text)
        if named is None:
            return None if _NAMED_PREFIX.fullmatch(text) else Parsed([], 0)
        start = named.end()
        if start == len(text):
            return None
        if text[start] != "{":
            return Parsed([], 0)
        end = balanced_end(text, start)
        if end is None:
            return None
        args = arguments_text(_loads(text[start:end]))
        return Parsed([(named.group(1), args)] if args is not None else [], end)


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _array_calls(text: str) -> list[tuple[str, str]]:
    items = _loads(text)
    if not isinstance(items, list) or not items:
        return []
    calls = [parse_call(json.dumps(item)) if isinstance(item, dict) else None for item in items]
    # NOTE: one bad item makes the whole list plain content, as the non-streaming answer must
    return [] if any(c is None for c in calls) else [c for c in calls if c is not None]
