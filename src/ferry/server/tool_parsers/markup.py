"""Parsers for formats where calls follow a start marker in free text (hermes, mistral).

Text outside calls is content; the tail that could be the start of the marker is held back, so no
partial ``<tool_call>`` ever reaches the client as content. After the marker a subclass reads the
call(s); what does not parse is given back as content, markup included.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.server.tool_parsers.base import CallNumbering, ContentGate, Event, holdback


@dataclass
class Parsed:
    calls: list[tuple[str, str]]  # (name, arguments JSON text); empty: the markup did not parse
    consumed: int  # characters of the text after the marker that the call(s) took


class MarkupParser:
    start: str = ""

    def __init__(self, numbering: CallNumbering | None = None) -> None:
        self._gate = ContentGate()
        self._ids = numbering or CallNumbering()
        self._pending = ""
        self._inside = False

    def _read(self, text: str) -> Parsed | None:
        """The call(s) at the start of ``text`` (what follows the marker); None: not complete yet."""
        raise NotImplementedError

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        while True:
            if not self._inside:
                at = self._pending.find(self.start)
                if at < 0:
                    keep = holdback(self._pending, self.start)
                    cut = len(self._pending) - keep
                    out += self._gate.text(self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return out
                out += self._gate.text(self._pending[:at])
                self._pending = self._pending[at + len(self.start):]
                self._inside = True
            parsed = self._read(self._pending)
            if parsed is None:
                return out
            raw = self._pending[:parsed.consumed]
            self._pending = self._pending[parsed.consumed:]
            self._inside = False
            if not parsed.calls:
                out += self._gate.text(self.start + raw)
                continue
            for name, arguments in parsed.calls:
                self._gate.call_starts()
                out += self._ids.events(name, arguments)

    def finish(self) -> list[Event]:
        rest = (self.start if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        return [*self._gate.text(rest), *self._gate.finish()]

