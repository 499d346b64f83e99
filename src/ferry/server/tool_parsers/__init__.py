"""Tool-call parsers: one module per output format, chosen by name (vLLM's ``--tool-call-parser``)
or guessed from the model's chat template. Modules are imported when first asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ferry.server.tool_parsers.base import ToolCallExtractor

# name -> "module:class"
PARSERS: dict[str, str] = {
    "hermes": "ferry.server.tool_parsers.hermes:HermesParser",
    "llama3_json": "ferry.server.tool_parsers.llama3_json:Llama3JsonParser",
    "mistral": "ferry.server.tool_parsers.mistral:MistralParser",
}


def parser_factory(name: str) -> Callable[[], ToolCallExtractor]:
    """The parser class of ``name`` (ValueError naming the known ones otherwise)."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(sorted(PARSERS))})")
    module, cls = PARSERS[name].split(":")
    factory: Callable[[], ToolCallExtractor] = getattr(importlib.import_module(module), cls)
    return factory


def needs_special_tokens(name: str) -> bool:
    """Whether the format's markers are special tokens, which the detokenizer must then keep."""
    return bool(getattr(parser_factory(name), "special_tokens", False))


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's own tool-call format asks for; None when it shows none."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "tool" in template):
        return "llama3_json"
    return None


__all__ = ["PARSERS", "needs_special_tokens", "parser_factory", "parser_for_template"]
