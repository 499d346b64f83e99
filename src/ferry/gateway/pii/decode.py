"""Text hidden inside a string by an encoding: JSON in a string, percent-encoding, HTML entities,
base64 and ``data:`` URIs.

Each helper returns what the string decodes to (to be scanned beside it), or raises ``Opaque``
when a string carries binary data (an image, audio) whose meaning no text detector can judge.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

# NOTE: strings this long that are nothing but base64 are data, not words; shorter runs (hashes,
# tokens, ids) are only decoded when they turn out to be text.
OPAQUE_MIN_CHARS = 1024
_OPAQUE_MIN_SYMBOLS = 32
_BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
# one run, or MIME-style lines; no spaces, so no run of words looks like data
_BASE64_WHOLE = re.compile(r"\s*[A-Za-z0-9+/_-]+(?:\r?\n[A-Za-z0-9+/_-]+)*={0,2}\s*")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_WORD = re.compile(r"(?<!\S)\S*[%&]\S*")  # NOTE: starts only at a word start: linear
_ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9A-Fa-f]+|[A-Za-z]+);")
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)
_TEXT_MIMES = re.compile(r"text/.*|application/(?:json|xml|[\w.+-]*\+(?:json|xml)|x-www-form-urlencoded)",
                         re.IGNORECASE)


class Opaque(ValueError):
    """The string carries binary data that cannot be scanned as text."""


def embedded_json(text: str) -> Any:
    """The object or array a string holds as JSON (tool-call arguments, schemas); None otherwise."""
    stripped = text.strip()
    if len(stripped) < 2 or stripped[0] not in "{[":
        return None
    try:
        value = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, (dict, list)) else None


def _as_text(raw: bytes) -> str | None:
    """``raw`` as UTF-8 text that reads as text (printable but for whitespace); None for binary."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    visible = sum(1 for ch in text if ch.isprintable() or ch in "\t\n\r")
    return text if text and visible >= 0.95 * len(text) else None


def _b64(token: str) -> bytes | None:
    compact = re.sub(r"\s+", "", token)
    padded = compact + "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_uri(text: str) -> list[str]:
    m = _DATA_URI.match(text.strip())
    if m is None:
        return []
    payload = text.strip()[m.end():]
    mime = m.group("mime") or "text/plain"
    raw = _b64(payload) if m.group("b64") else unquote_to_bytes(payload)
    decoded = _as_text(raw) if raw is not None else None
    if decoded is None or not _TEXT_MIMES.fullmatch(mime):
        if len(payload) < 16:
            return []  # NOTE: "data:image/png;base64,AAAA" carries no picture worth a refusal
        raise Opaque(f"inline {mime} data")
    return [decoded]


def decoded_forms(text: str) -> list[str]:
    """What ``text`` decodes to under each encoding that changes it; raises ``Opaque`` for binary data."""
    if text.lstrip()[:5].lower() == "data:":
        forms = _data_uri(text)
        if forms:
            return forms
    out: list[str] = []
    if "%" in text or "&" in text:
        words = _encoded_words(text)
        if words:
            out.append(" ".join(words))
    out.extend(_base64_texts(text))
    return out


def _encoded_words(text: str) -> list[str]:
    """The whitespace-separated words holding percent-encoding or HTML entities, decoded.

    NOTE: words, not the whole string: one "%20" in a long prompt must not add a second copy of it
    to what the scan reads (and counts against its size bound).
    """
    words: list[str] = []
    for m in _WORD.finditer(text):
        word = m.group()
        if _PERCENT.search(word):
            word = unquote(word)
            word = unquote(word) if _PERCENT.search(word) else word  # NOTE: double encoding too
        if _ENTITY.search(word):
            word = html.unescape(word)
        if word != m.group():
            words.append(word)
    return words


def _base64_texts(text: str) -> list[str]:
    # NOTE: base64 of binary data uses nearly all 64 symbols; hex, DNA and other long runs of a small
    # alphabet are text, however long.
    if len(text) >= OPAQUE_MIN_CHARS and _BASE64_WHOLE.fullmatch(text) and len(set(text)) >= _OPAQUE_MIN_SYMBOLS:
        raw = _b64(text)
        if raw is not None:
            decoded = _as_text(raw)
            if decoded is None:
                raise Opaque(f"{len(text)} characters of base64 binary data")
            return [decoded]
    out: list[str] = []
    for m in _BASE64_TOKEN.finditer(text):
        token = m.group()
        if _HEX.fullmatch(token):
            continue  # NOTE: hashes; they decode to noise
        raw = _b64(token)
        decoded = _as_text(raw) if raw else None
        if decoded is not None:
            out.append(decoded)
    return out
