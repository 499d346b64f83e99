"""Text as the detectors see it: one canonical spelling for the many ways to write the same characters.

    NFKD (full-width ＠ -> @, ① -> 1, ligatures, compatibility spaces)
      -> drop what renders as nothing: format characters (zero-width spaces and joiners, soft hyphens,
         bidi controls, tag characters), combining marks (so accents and strike-through overlays
         go), variation selectors, control characters, Hangul fillers
      -> fold look-alike letters of other scripts to Latin (``confusables``)
      -> every script's decimal digits to ASCII, dashes to ``-``, ideographic full stops to ``.``,
         every space to `` ``

The result is only ever matched against; the request itself goes upstream unchanged.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from types import MappingProxyType

from ferry.gateway.pii.confusables import CONFUSABLES

# NOTE: default-ignorable code points that are not in category Cf, so the category rule misses them.
_IGNORABLE = (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0)
_PUNCTUATION = {
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u2212": "-", "\u2043": "-", "\ufe58": "-", "\ufe63": "-", "\uff0d": "-",
    "\u3002": ".", "\uff61": ".", "\u2024": ".", "\u00b7": ".",
    "\ufe6b": "@", "\uff20": "@",
}
_WHITESPACE_CONTROLS = "\t\n\r\x0b\x0c"


def _code_points() -> Iterator[int]:
    """Every assigned-or-plausible code point worth a table entry: the BMP and planes 1-3 (surrogates
    aside), and plane 14's tags and variation selectors; planes 4-13 and 15-16 hold nothing printable."""
    yield from range(0xD800)
    yield from range(0xE000, 0x40000)
    yield from range(0xE0000, 0xE1000)


def _build_table() -> MappingProxyType[int, str | None]:
    """``str.translate`` table: code point -> replacement (None deletes)."""
    table: dict[int, str | None] = {}
    for cp in _code_points():
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me", "Cf"):
            table[cp] = None
        elif cat == "Cc":
            table[cp] = " " if ch in _WHITESPACE_CONTROLS else None
        elif cat in ("Zs", "Zl", "Zp") and ch != " ":
            table[cp] = " "
        elif cat == "Nd" and cp >= 0x80:
            table[cp] = str(unicodedata.decimal(ch))
    for cp in _IGNORABLE:
        table[cp] = None
    for ch, rep in _PUNCTUATION.items():
        table[ord(ch)] = rep
    table.update(CONFUSABLES)
    for ch in "\t\n\r":  # NOTE: kept as they are: newlines separate lines for the detectors
        table.pop(ord(ch), None)
    return MappingProxyType(table)


# NOTE: built once at import (a fraction of a second) and never changed: a constant.
_TABLE = _build_table()


def normalize(text: str) -> str:
    """The detectors' view of ``text``; ASCII without control characters comes back as it is."""
    if text.isascii() and text.isprintable():
        return text
    return unicodedata.normalize("NFKD", text).translate(_TABLE)
