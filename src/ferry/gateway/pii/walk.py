"""Every string a request body carries, found by walking the whole body rather than a list of fields.

Whatever reaches the upstream is read: message contents and their parts, tool calls' arguments,
tool descriptions and parameter schemas, ``name``, ``user``, ``metadata``, ``stop``,
``response_format``, ``suffix``, dictionary keys, numbers, and any field an API adds later. Strings
that hold JSON are walked too, and so is what a string decodes to (``decode.decoded_forms``).

Two views come out:

- ``values``: every string, each scanned on its own;
- ``conversation``: the free text in document order (structural values such as ``role`` and
  ``type`` left out), scanned joined, so a value split across two messages or two parts is whole
  again.

The walk is bounded; past a bound it raises ``ScanFailed`` and the request is kept on-prem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ferry.gateway.pii.decode import Opaque, decoded_forms, embedded_json

# NOTE: the values of these keys are enumerations or identifiers ("user", "text", "auto", a model
# or function name, an image URL); between two halves of a split value they would keep them apart.
# They are still scanned on their own, like every string.
STRUCTURAL_KEYS = frozenset({
    "role", "type", "model", "id", "tool_call_id", "name", "detail", "object", "format", "voice",
    "tool_choice", "service_tier", "reasoning_effort", "modalities", "url", "encoding_format",
})


@dataclass(frozen=True)
class ScanBounds:
    """How much of a body the scanner reads before it gives up and fails closed."""

    max_depth: int = 64  # nested objects and arrays, JSON inside strings included
    max_chars: int = 1 << 20  # characters of text, keys and decoded forms included
    max_values: int = 100_000  # strings, keys and numbers
    deadline_s: float = 5.0  # seconds for walking and matching together

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_chars", "max_values"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")


class ScanFailed(Exception):
    """The body could not be classified; ``reason`` is one of too_deep, too_large, too_many_values,
    timeout, binary_data, error."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BodyText:
    values: tuple[str, ...]
    conversation: tuple[str, ...]


class _Walker:
    """One body's walk: counts against the bounds as it goes (local to one call, never shared)."""

    def __init__(self, bounds: ScanBounds, deadline: float) -> None:
        self.bounds = bounds
        self.deadline = deadline
        self.values: list[str] = []
        self.conversation: list[str] = []
        self.chars = 0

    def _add(self, text: str, free_text: bool) -> None:
        self.chars += len(text)
        if self.chars > self.bounds.max_chars:
            raise ScanFailed("too_large", f"more than {self.bounds.max_chars} characters of text")
        if len(self.values) >= self.bounds.max_values:
            raise ScanFailed("too_many_values", f"more than {self.bounds.max_values} values")
        if len(self.values) % 1024 == 0 and time.monotonic() > self.deadline:
            raise ScanFailed("timeout", f"not read within {self.bounds.deadline_s} s")
        self.values.append(text)
        if free_text:
            self.conversation.append(text)

    def walk(self, value: Any, depth: int, free_text: bool) -> None:
        if isinstance(value, str):
            self._string(value, depth, free_text)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, (int, float)):
            self._add(str(value), False)  # NOTE: a card number sent as a JSON number is still one
        elif isinstance(value, dict):
            self._nest(depth)
            for key, item in value.items():
                self._add(str(key), False)
                self.walk(item, depth + 1, free_text and key not in STRUCTURAL_KEYS)
        elif isinstance(value, list):
            self._nest(depth)
            for item in value:
                self.walk(item, depth + 1, free_text)
        else:
            raise ScanFailed("error", f"unexpected {type(value).__name__} in the body")

    def _nest(self, depth: int) -> None:
        if depth >= self.bounds.max_depth:
            raise ScanFailed("too_deep", f"nested deeper than {self.bounds.max_depth} levels")

    def _string(self, text: str, depth: int, free_text: bool) -> None:
        parsed = embedded_json(text)
        # NOTE: JSON in a string (tool-call arguments) joins the conversation by its values, not by
        # its raw text, whose quotes and keys would sit between two halves of a split value.
        self._add(text, free_text and parsed is None)
        if parsed is not None:
            self.walk(parsed, depth + 1, free_text)
            return
        try:
            forms = decoded_forms(text)
        except Opaque as e:
            raise ScanFailed("binary_data", str(e)) from e
        for form in forms:
            if form != text:
                self._nest(depth + 1)  # NOTE: base64 in base64 in ... counts as nesting
                self._string(form, depth + 1, False)


def collect(body: Any, bounds: ScanBounds, deadline: float) -> BodyText:
    """The strings of ``body`` (values and conversation); raises ``ScanFailed`` past a bound."""
    walker = _Walker(bounds, deadline)
    try:
        walker.walk(body, 0, True)
    except RecursionError as e:  # NOTE: max_depth normally stops the walk long before this
        raise ScanFailed("too_deep", "nested beyond the interpreter's recursion limit") from e
    return BodyText(tuple(walker.values), tuple(walker.conversation))
