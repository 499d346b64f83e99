"""``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call
(Qwen2.5, Qwen3, Hermes 2/3 and many fine-tunes)."""

from __future__ import annotations

import json

from ferry.server.tool_parsers.base import arguments_text
from ferry.server.tool_parsers.markup import MarkupParser, Parsed

END = "</tool_call>"


def parse_call(body: str) -> tuple[str, str] | None:
    """``{"name": ..., "arguments": ...}`` -> (name, arguments JSON text); None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = arguments_text(args)
    return None if text is None else (obj["name"], text)


class HermesParser(MarkupParser):
    start = "<tool_call>"
    special_tokens = False  # Qwen's <tool_call> is an added token but not a special one

    def _read(self, text: str) -> Parsed | None:
        end = text.find(END)
        if end < 0:
            return None
        call = parse_call(text[:end].strip())
        return Parsed([call] if call else [], end + len(END))
