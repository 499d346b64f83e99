"""``llama3_json``: Llama 3.1/3.2/3.3's JSON tool calls, ``{"name": ..., "parameters": {...}}``,
at the very start of the answer, possibly after ``<|python_tag|>``, several separated by ``;``.

An answer that does not start that way is plain content throughout (so a JSON answer to a
question is not taken for a call unless it names one). After the calls, text that is not another
call is content.
"""

from __future__ import annotations

from ferry.server.tool_parsers.base import (
    CallNumbering,
    ContentGate,
    Event,
    next_object,
)
from ferry.server.tool_parsers.hermes import parse_call

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    special_tokens = True  # <|python_tag|> is a special token

    def __init__(self) -> None:
        self._gate = ContentGate()
        self._ids = CallNumbering()
        self._pending = ""
        self._mode = "start"  # start -> calls -> content (for good)

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        if self._mode == "start":
            body = self._pending.lstrip()
            if not body or (PYTHON_TAG.startswith(body) and body != PYTHON_TAG):
                return out
            if body.startswith(PYTHON_TAG):
                self._pending, self._mode = body[len(PYTHON_TAG):], "calls"
            elif body.startswith("{"):
                self._pending, self._mode = body, "calls"
            else:
                self._mode = "content"
        while self._mode == "calls":
            kind, rest, start, end = next_object(self._pending, ";")
            self._pending = self._pending[rest:]
            if kind == "wait":
                return out
            call = parse_call(self._pending[start - rest:end - rest]) if kind == "object" else None
            if call is None:
                self._mode = "content"
                break
            self._pending = self._pending[end - rest:]
            self._gate.call_starts()
            out += self._ids.events(*call)
        text, self._pending = self._pending, ""
        return out + self._gate.text(text)

    def finish(self) -> list[Event]:
        text, self._pending = self._pending, ""
        return [*self._gate.text(text), *self._gate.finish()]
