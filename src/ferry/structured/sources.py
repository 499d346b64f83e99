"""``StructuredOutputsParams`` -> llguidance grammar text (no tokenizer needed, no compiling).

JSON schemas follow OpenAI's strict mode as vLLM's default backend (xgrammar) applies it to every
schema: an object that declares ``properties`` and says nothing of ``additionalProperties`` gets
``additionalProperties: false``; one without ``properties`` (``{"type": "object"}``) stays any
object. ``required`` is honoured as given.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured.errors import GrammarError

# Keys whose value is one subschema / a list of them / a name -> subschema map.
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedItems")
_MANY = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

# JSON compile options: one-line JSON with ", " and ": " (as OpenAI's answers look).
# NOTE: no free whitespace between tokens: a small model given the choice tends to emit newlines
# and indentation without end inside an otherwise valid document, until max_tokens cuts it.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                 "key_separator": ": "}


def strict_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` where objects that declare properties forbid undeclared ones."""
    out = copy.deepcopy(schema)
    _close_objects(out, in_all_of=False)
    return out


def _close_objects(node: Any, in_all_of: bool) -> None:
    if not isinstance(node, dict):
        return
    # NOTE: a branch of allOf must not close itself: the other branches' properties would become
    # forbidden, and no document could match them all.
    if (not in_all_of and isinstance(node.get("properties"), dict)
            and "additionalProperties" not in node and "unevaluatedProperties" not in node):
        node["additionalProperties"] = False
    for key in _ONE:
        _close_objects(node.get(key), in_all_of=False)
    extra = node.get("additionalProperties")
    _close_objects(extra, in_all_of=False)
    for key in (*_MANY, "allOf"):
        subs = node.get(key)
        if isinstance(subs, list):
            for sub in subs:
                _close_objects(sub, in_all_of=key == "allOf")
    for key in _MAP:
        subs = node.get(key)
        if isinstance(subs, dict):
            for sub in subs.values():
                _close_objects(sub, in_all_of=False)


def constraint_param(params: StructuredOutputsParams) -> str:
    """The field a compile error names: the request's own (``source``), else vLLM's name."""
    if params.source:
        return params.source
    if params.json_object:
        return "structured_outputs.json_object"
    kind = next(k for k in ("json", "regex", "choice", "grammar") if getattr(params, k) is not None)
    return f"structured_outputs.{kind}"


def grammar_source(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for ``params`` (GrammarError for text that cannot even be read)."""
    if params.json_object:
        return _json_grammar({"type": "object"}, constraint_param(params))
    if params.json is not None:
        return _json_grammar(params.json, constraint_param(params))
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        # NOTE: JSON string literals are Lark string literals: quotes, backslashes and newlines
        # in a choice stay literal text.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if params.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(
            _guarded(lambda: any_to_lark(params.grammar or ""), constraint_param(params),
                     "cannot read the grammar (Lark, or EBNF/GBNF)"))
    raise GrammarError("structured_outputs", "no constraint given")


def _json_grammar(schema: dict[str, Any] | str, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(param, f"the JSON schema is not valid JSON: {exc}") from exc
    if schema is True:  # JSON Schema's "anything"
        schema = {}
    if schema is False:
        raise GrammarError(param, "the JSON schema false allows no value at all")
    if not isinstance(schema, dict):
        raise GrammarError(param, f"a JSON schema must be an object, got {type(schema).__name__}")
    closed = strict_json_schema(schema)
    return _guarded(lambda: llguidance.LLMatcher.grammar_from_json_schema(
        closed, overrides=_JSON_OPTIONS), param, "invalid JSON schema")  # type: ignore[arg-type]


def _guarded(make: Callable[[], str], param: str, what: str) -> str:
    try:
        return make()
    except Exception as exc:
        # NOTE: llguidance's JSON reader and its GBNF converter raise plain exceptions (even bare
        # ``Exception("Rule 'x' not found")``) for unreadable user text; these calls only read
        # that text, so any failure is the client's to hear: a 400 naming the field.
        raise GrammarError(param, f"{what}: {exc}") from exc
