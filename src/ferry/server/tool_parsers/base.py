"""What every tool-call parser shares: the events it emits, the whitespace rule, and assembly.

A parser is a ``ToolCallExtractor``: it is fed a choice's text as it is generated and emits events,
``Content`` (text the client sees as ``content``) and ``CallDelta`` (a tool call's id and name, or a
fragment of its arguments). The non-streaming answer is made by feeding the whole text at once and
joining the events (``assemble``), so a stream always reassembles into the same message: the
parsers are written so that their events do not depend on how the text was cut into pieces.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallDelta:
    """A tool call's start (``id`` and ``name`` set, ``arguments`` "") or a fragment of its
    arguments (``id`` and ``name`` None)."""

    index: int  # the call's position among this choice's calls
    arguments: str
    id: str | None = None
    name: str | None = None


Event = Content | CallDelta


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallExtractor(Protocol):
    def feed(self, text: str) -> list[Event]:
        """Events for ``text``, the next piece of the output."""

    def finish(self) -> list[Event]:
        """Events for whatever was held back, once the output is complete."""


def openai_call_id() -> str:
    """vLLM's tool call ids: ``chatcmpl-tool-`` and 32 hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def mistral_call_id() -> str:
    # NOTE: Mistral's chat templates refuse ids that are not 9 alphanumeric characters.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def arguments_text(arguments: Any) -> str | None:
    """A call's arguments as JSON text: a dict is dumped, a string is kept if it holds a JSON
    object; anything else is not a call (None)."""
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):
        try:
            return arguments if isinstance(json.loads(arguments), dict) else None
        except ValueError:
            return None
    return None


def next_object(text: str, separator: str) -> tuple[str, int, int, int]:
    """The next JSON object of a run of calls (``{...}`` items between ``separator`` characters and
    whitespace) at the front of buffered ``text``: ``(kind, rest, start, end)``.

    ``rest`` is where the text after the separators read begins; ``kind`` is ``"wait"`` while more
    text must come, ``"object"`` for ``text[start:end]``, ``"other"`` when ``text[start]`` begins
    something else.
    """
    rest = i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return "wait", rest, i, i
        if text[i] == separator:
            rest = i = i + 1
            continue
        if text[i] != "{":
            return "other", rest, i, i
        end = balanced_end(text, i)
        return ("wait", rest, i, i) if end is None else ("object", rest, i, end)


def balanced_end(text: str, start: int) -> int | None:
    """The index just after the JSON object or array opening at ``text[start]``, or None while it
    is not closed yet. Brackets inside strings do not count."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def holdback(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ContentGate:
    """Content with its whitespace rule: whitespace next to a tool call is dropped.

    Trailing whitespace is held until more text follows (then it is sent) or a call starts (then
    it is dropped); at the end it is sent only if the output made no call.
    """

    calls: int = 0
    _held: str = ""
    _after_call: bool = False  # nothing sent since the last call: leading whitespace is dropped

    def text(self, text: str) -> list[Event]:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        body = text.rstrip()
        if not body:
            self._held += text
            return []
        out = self._held + body
        self._held = text[len(body):]
        return [Content(out)]

    def call_starts(self) -> None:
        self._held = ""
        self._after_call = True
        self.calls += 1

    def finish(self) -> list[Event]:
        held, self._held = self._held, ""
        return [Content(held)] if held and not self.calls else []


@dataclass
class CallNumbering:
    """Hands out call indexes and ids, and turns a parsed call into its two events."""

    make_id: Any = openai_call_id
    count: int = 0

    def events(self, name: str, arguments: str) -> list[Event]:
        index = self.count
        self.count += 1
        return [CallDelta(index, "", id=self.make_id(), name=name), CallDelta(index, arguments)]


@dataclass
class Assembled:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def assemble(events: Sequence[Event]) -> Assembled:
    """Join events into a message: content (None when empty and there are calls) and calls."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for e in events:
        if isinstance(e, Content):
            content.append(e.text)
        else:
            if e.id is not None and e.name is not None:
                heads[e.index] = (e.id, e.name)
            calls.setdefault(e.index, []).append(e.arguments)
    text = "".join(content)
    tool_calls = [ToolCall(heads[i][0], heads[i][1], "".join(calls[i])) for i in sorted(calls)]
    return Assembled(None if not text and tool_calls else text, tool_calls)


def run_all(extractor: ToolCallExtractor, text: str) -> Assembled:
    """The non-streaming answer: the whole text at once."""
    return assemble([*extractor.feed(text), *extractor.finish()])
