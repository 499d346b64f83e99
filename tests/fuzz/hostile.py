"""Hostile mutations of a valid JSON body: what an OpenAPI schema cannot generate.

A schema-driven fuzzer only writes JSON that a JSON encoder would, so it never sends a lone
surrogate escape, JSON nested thousands deep, a number that overflows a float, ``NaN``, or a JSON
body labelled ``text/plain``: exactly the inputs that once cost `ferry serve` and the gateway a 500.
``mutate`` takes a body the schema allows and breaks it in one of those ways, at a place Hypothesis
draws, and returns the raw bytes to send with their Content-Type.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

_MARK = "__ferry_fuzz_mark__"
KINDS = ("lone_surrogate", "deep_nesting", "overflow", "non_finite", "string_for_scalar",
         "text_plain")
_SURROGATES = ("\ud800", "x\udfff", "\udc00\ud800", "\ud83d")  # the last: a pair's first half alone
_DEPTHS = (201, 5_000, 100_000)
_RAW_NUMBERS = (b"1e999", b"-1e400", b"1" + b"0" * 400 + b".5")
_NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")
_SCALAR_STRINGS = ("yes", "true", "1", "0.5", "")

Path = tuple[str | int, ...]


def _places(value: Any, path: Path = ()) -> list[Path]:
    """Every place in a JSON value, containers included, the root excepted."""
    out: list[Path] = []
    items: list[tuple[str | int, Any]] = (list(value.items()) if isinstance(value, dict)
                                          else list(enumerate(value)) if isinstance(value, list)
                                          else [])
    for key, child in items:
        out.append((*path, key))
        out.extend(_places(child, (*path, key)))
    return out


def _set(body: dict[str, Any], path: Path, new: Any) -> dict[str, Any]:
    copy: Any = json.loads(json.dumps(body))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return dict(copy)


def mutate(body: dict[str, Any], data: st.DataObject) -> tuple[str, bytes, str]:
    """(what was done, the raw body, its Content-Type) for one hostile variant of ``body``."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    if kind == "text_plain":
        return kind, json.dumps(body).encode(), "text/plain"
    places = _places(body) or [("extra",)]
    path = data.draw(st.sampled_from(places), label="place")
    what = f"{kind} at {'.'.join(map(str, path))}"
    if kind == "lone_surrogate":
        # NOTE: json.dumps writes a lone surrogate as its \uXXXX escape, as a careless client would.
        value = data.draw(st.sampled_from(_SURROGATES), label="surrogate")
        return what, json.dumps(_set(body, path, value)).encode(), "application/json"
    if kind == "string_for_scalar":
        value = data.draw(st.sampled_from(_SCALAR_STRINGS), label="string")
        return what, json.dumps(_set(body, path, value)).encode(), "application/json"
    if kind == "deep_nesting":
        depth = data.draw(st.sampled_from(_DEPTHS), label="depth")
        raw = b"[" * depth + b"]" * depth
    elif kind == "overflow":
        raw = data.draw(st.sampled_from(_RAW_NUMBERS), label="number")
    else:
        raw = data.draw(st.sampled_from(_NON_FINITE), label="number")
    text = json.dumps(_set(body, path, _MARK)).encode()
    return what, text.replace(json.dumps(_MARK).encode(), raw, 1), "application/json"
