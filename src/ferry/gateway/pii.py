"""PII detection: emails, phone numbers, card numbers (Luhn), IBANs (mod-97), national ids, custom patterns.

Checksums keep false positives down: a 16-digit order number is a card only when its Luhn sum works out,
and a string shaped like an IBAN counts only when its ISO 13616 mod-97 check equals 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# international "+<country> …" or grouped national numbers such as (555) 123-4567 / 030 1234 5678
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?(?:\(\d{1,4}\)[\s.\-]?)?\d{1,4}(?:[\s.\-]?\d{2,4}){2,4}"
    r"|\(\d{2,4}\)[\s.\-]?\d{3,4}[\s.\-]\d{3,5}"
    r"|\d{3}[\s.\-]\d{3}[\s.\-]\d{4})(?![\w])")
_CARD = re.compile(r"(?<!\d)(?:\d[ \-]?){12,18}\d(?!\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
# US social security numbers and UK national insurance numbers
_SSN = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z]{2}"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits (card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters -> 10..35, the number mod 97 is 1."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _cards(text: str) -> bool:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ \-]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def _ibans(text: str) -> bool:
    return any(iban_ok(m.group()) for m in _IBAN.finditer(text))


def _phones(text: str) -> bool:
    for m in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 7 <= len(digits) <= 15:
            return True
    return False


_BUILTIN: dict[str, Callable[[str], bool]] = {
    "email": lambda t: _EMAIL.search(t) is not None,
    "phone": _phones,
    "card": _cards,
    "iban": _ibans,
    "national_id": lambda t: _SSN.search(t) is not None or _NINO.search(t) is not None,
}


@dataclass(frozen=True)
class PiiDetector:
    """Which detectors run; ``scan`` returns the names of those that fired, in a stable order."""

    detectors: tuple[str, ...] = tuple(_BUILTIN)
    patterns: Mapping[str, str] = field(default_factory=dict)  # name -> regex

    def __post_init__(self) -> None:
        for d in self.detectors:
            if d not in _BUILTIN:
                raise ValueError(f"detectors: unknown detector {d!r}")
        compiled = {name: re.compile(p) for name, p in dict(self.patterns).items()}
        object.__setattr__(self, "_compiled", compiled)

    def scan(self, texts: Iterable[str]) -> tuple[str, ...]:
        found: list[str] = []
        texts = [t for t in texts if t]
        for name in self.detectors:
            if any(_BUILTIN[name](t) for t in texts):
                found.append(name)
        for name, rx in self._compiled.items():  # type: ignore[attr-defined]
            if any(rx.search(t) for t in texts):
                found.append(name)
        return tuple(found)


def request_texts(body: Mapping[str, object]) -> list[str]:
    """Every piece of user-supplied text in a chat or completions body."""
    texts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            content = msg.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
    return texts
