"""``tool_choice`` a named function or ``required``: the grammar makes the output JSON (vLLM's way),
and these read it back as calls.

Named: the output is the function's arguments, streamed as they come. Required: the output is a
JSON array of ``{"name": ..., "parameters": {...}}``; each element becomes a call once it is
complete. Output that is not of that shape (no grammar, or a ``max_tokens`` cut) is content.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from ferry.server.tool_parsers.base import (
    CallDelta,
    CallNumbering,
    ContentGate,
    Event,
    arguments_text,
    next_object,
)

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


class NamedCall:
    """The whole output is the arguments of one call to ``name``."""

    special_tokens = False

    def __init__(self, name: str) -> None:
        self._name = name
        self._ids = CallNumbering()
        self._started = False

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        out: list[Event] = []
        if not self._started:
            self._started = True
            out += self._ids.events(self._name, "")[:1]
        return [*out, CallDelta(0, text)]

    def finish(self) -> list[Event]:
        return []


class RequiredCalls:
    """``[{"name": ..., "parameters": {...}}, ...]`` -> one call per element."""

    special_tokens = False

    def __init__(self, names: Sequence[str]) -> None:
        self._names = frozenset(names)
        self._gate = ContentGate()
        self._ids = CallNumbering()
        self._pending = ""
        self._mode = "start"  # start -> items -> done | content

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        if self._mode == "start":
            body = self._pending.lstrip()
            if not body:
                return out
            if body[0] != "[":
                self._mode = "content"
            else:
                self._pending, self._mode = body[1:], "items"
        while self._mode == "items":
            kind, rest, start, end = next_object(self._pending, ",")
            if kind == "other" and self._pending[start] == "]":
                self._pending, self._mode = self._pending[start + 1:], "done"
                break
            self._pending = self._pending[rest:]
            if kind == "wait":
                return out
            call = self._call(self._pending[start - rest:end - rest]) if kind == "object" else None
            if call is None:
                self._mode = "content"
                break
            self._pending = self._pending[end - rest:]
            self._gate.call_starts()
            out += self._ids.events(*call)
        return out + self._flush()

    def _flush(self) -> list[Event]:
        if self._mode == "items":
            return []
        text, self._pending = self._pending, ""
        return self._gate.text(text)

    def _call(self, text: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self._names:
            return None
        args = arguments_text(obj.get("parameters", {}))
        return None if args is None else (obj["name"], args)

    def finish(self) -> list[Event]:
        text, self._pending = self._pending, ""
        return [*self._gate.text(text), *self._gate.finish()]


def function_parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters schema; none given: an object with no properties (as vLLM)."""
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else EMPTY_OBJECT


def required_schema(functions: Sequence[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema for ``tool_choice: "required"``: an array of at least one call, each
    ``{"name": <one of the tools>, "parameters": <that tool's schema>}``; at most one call when
    ``parallel`` is false. Each tool's ``$defs`` move to the top, where its ``$ref``s point."""
    defs: dict[str, Any] = {}
    items = []
    for f in functions:
        params = copy.deepcopy(function_parameters(f))
        for key, value in params.pop("$defs", {}).items():
            if key in defs and defs[key] != value:
                raise ValueError(f"tools define $defs/{key} differently; tool_choice 'required' "
                                 "needs one meaning per definition name")
            defs[key] = value
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                     "parameters": params},
                      "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
