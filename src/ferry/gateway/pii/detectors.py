"""The built-in detectors: each takes normalized text (``normalize.normalize``) and says whether it fired.

Checksums and numbering plans come from tested libraries: ``python-stdnum`` (Luhn, IBAN with each
country's length and format, US SSN and ITIN rules) and ``phonenumbers`` (libphonenumber's
metadata). Finding candidates in free text, and the rules that keep ordinary numbers out, are
ferry's: card numbers must carry an issuer's prefix and be written as one number or in groups
with one kind of separator; a 9-digit number counts as an SSN only in the 3-2-4 grouping or
after a word such as "SSN"; a bare 10- or 11-digit number counts as a phone number only when
libphonenumber calls it a valid US, UK, German, French or Dutch number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from types import MappingProxyType

import phonenumbers
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.us import itin, ssn


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits (card numbers)."""
    return digits.isdigit() and luhn.is_valid(digits)


def iban_ok(text: str) -> bool:
    """ISO 13616: the country's length and format, and the mod-97 check (python-stdnum)."""
    return std_iban.is_valid(text)


# ---- digit runs: numbers written with or without separators -------------------------------------

_SEP = r"(?:[ \t]*[-.][ \t]*|[ \t]+)"
_RUN = re.compile(rf"\d+(?:{_SEP}\d+)*")
_SPLIT = re.compile(rf"({_SEP})")


def _runs(text: str, min_digits: int) -> Iterator[tuple[re.Match[str], list[str], list[str]]]:
    """(match, digit groups, separators) of each run of digits with at least ``min_digits`` characters."""
    for m in _RUN.finditer(text):
        if len(m.group()) < min_digits:
            continue
        parts = _SPLIT.split(m.group())
        yield m, parts[0::2], [s.strip() or " " for s in parts[1::2]]


def _windows(groups: list[str], seps: list[str], lo: int, hi: int, max_group: int) -> Iterator[str]:
    """Digits of each run of whole groups with lo..hi digits and one kind of separator.

    NOTE: in a long list of numbers only windows at its start or end count; a window anywhere in a
    table of numbers would pass a 1-in-10 checksum now and then.
    """
    n = len(groups)
    for i in range(n):
        total = 0
        for j in range(i, n):
            if j > i and (seps[j - 1] != seps[i] or len(groups[j]) > max_group or len(groups[i]) > max_group):
                break
            total += len(groups[j])
            if total > hi:
                break
            if total >= lo and (n <= 6 or i == 0 or j == n - 1):
                yield "".join(groups[i:j + 1])


# ---- card numbers ------------------------------------------------------------------------------

def _issuer_prefix(d: str) -> bool:
    """An issuer identification number of a card scheme (Visa, Mastercard, Amex, Discover, Diners,
    JCB, UnionPay, Maestro, Mir, RuPay)."""
    two, three, four = int(d[:2]), int(d[:3]), int(d[:4])
    return (d[0] in "46" or 50 <= two <= 59 or 2200 <= four <= 2204 or 2221 <= four <= 2720
            or two in (34, 36, 37, 38, 39, 81, 82) or 300 <= three <= 305 or 3528 <= four <= 3589)


def cards(text: str) -> bool:
    for _, groups, seps in _runs(text, 13):
        for digits in _windows(groups, seps, 13, 19, 8):
            if _issuer_prefix(digits) and luhn.is_valid(digits):
                return True
    return False


# ---- national ids: US SSN / ITIN, UK NINO -------------------------------------------------------

# NOTE: stdnum rejects these as "never issued", but they were printed on sample cards and are in
# use as real numbers; a request quoting one is carrying SSN data.
_PUBLISHED_SSNS = frozenset({"078051120", "457555462", "219099999"})
_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|ss#|social|soc\.?\s*sec|taxpayer|tax\s*id|tin|itin|tax\s*number)\b")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r"[ .\-]?\d{2}[ .\-]?\d{2}[ .\-]?\d{2}[ .\-]?[A-D](?![A-Za-z0-9])", re.IGNORECASE)


def _us_tax_id(digits: str) -> bool:
    return ssn.is_valid(digits) or digits in _PUBLISHED_SSNS or itin.is_valid(digits)


def national_ids(text: str) -> bool:
    for m, groups, seps in _runs(text, 9):
        if [len(g) for g in groups] == [9]:
            context = text[max(0, m.start() - 40):m.start()]
            if _SSN_CONTEXT.search(context) and _us_tax_id(groups[0]):
                return True
            continue
        for i in range(len(groups) - 2):
            shape = [len(g) for g in groups[i:i + 3]]
            if shape == [3, 2, 4] and seps[i] == seps[i + 1] and _us_tax_id("".join(groups[i:i + 3])):
                return True
    return _NINO.search(text) is not None


# ---- IBAN ----------------------------------------------------------------------------------------

# NOTE: a lookahead, so candidates overlap: a junk "XX00 ..." before an IBAN cannot swallow its start.
_IBAN_START = re.compile(r"(?<![A-Z0-9])(?=([A-Z]{2}\d{2}(?:[ \-]?[A-Z0-9]){11,40}))")


def ibans(text: str) -> bool:
    upper = text.upper()  # NOTE: "de89 3704 ..." is the same account
    for m in _IBAN_START.finditer(upper):
        compact = re.sub(r"[ \-]", "", m.group(1))
        # the candidate may run into the next word: try every length an IBAN can have
        if any(std_iban.is_valid(compact[:n]) for n in range(15, min(34, len(compact)) + 1)):
            return True
    return False


# ---- email ---------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
_AT = re.compile(r"\s*[\[({<]\s*(?:at|@)\s*[\])}>]\s*", re.IGNORECASE)
_DOT = re.compile(r"\s*[\[({<]\s*(?:dot|\.)\s*[\])}>]\s*", re.IGNORECASE)
# NOTE: "jane at example dot com" only when it ends in a common top-level domain: "look at this dot
# plot" is prose.
_SPELLED = re.compile(r"\b([\w.+-]+)\s+at\s+((?:[\w-]+\s+dot\s+)+(?:com|org|net|edu|gov|io|co|uk|de|fr|nl|es|"
                      r"ch|ca|au|eu|info|biz))\b", re.IGNORECASE)
_SPELLED_DOT = re.compile(r"\s+dot\s+", re.IGNORECASE)
# NOTE: cheap tests first: the rewrites above cost a pass each over the text, so they run only on
# text that has a bracketed "at"/"dot" or a spelled " dot ".
_OBFUSCATED = re.compile(r"[\[({<]\s*(?:at|@|dot|\.)\s*[\])}>]|\sdot\s", re.IGNORECASE)
# NOTE: role accounts in code and configs (git@github.com:org/repo) are addresses of no person.
_ROLE_ACCOUNTS = frozenset({"git", "noreply", "no-reply", "donotreply", "do-not-reply"})


def _deobfuscated(text: str) -> str:
    text = _DOT.sub(".", _AT.sub("@", text))
    return _SPELLED.sub(lambda m: f"{m.group(1)}@{_SPELLED_DOT.sub('.', m.group(2))}", text)


def emails(text: str) -> bool:
    candidates = [text] if "@" in text else []
    if _OBFUSCATED.search(text):
        candidates.append(_deobfuscated(text))
    for candidate in candidates:
        for m in _EMAIL.finditer(candidate):
            if m.group().split("@", 1)[0].lower() not in _ROLE_ACCOUNTS:
                return True
    return False


# ---- phone numbers -------------------------------------------------------------------------------

# grouped national formats: (555) 123-4567, 555-123-4567, 555.123.4567
_FORMATTED = re.compile(r"(?<![\w+])(?:\(\d{2,4}\)[ \t.\-]?\d{3,4}[ \t.\-]\d{3,5}"
                        r"|\d{3}[ \t.\-]\d{3}[ \t.\-]\d{4})(?!\w)")
_INTERNATIONAL = re.compile(r"(?<![\w+])(?:\+|00)\d[\d \-.()/]{5,24}\d")
_NATIONAL_ZERO = re.compile(r"(?<![\w+.\-/])0\d{1,4}(?:[ \-]?\d{2,8}){1,4}(?![\w.\-/])")
_BARE = re.compile(r"(?<![\w.\-/:+])\d{10,11}(?![\w\-/:]|\.\d)")
_ZERO_REGIONS = ("GB", "DE", "FR", "NL")


def _valid(number: str, region: str | None) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, region))
    except phonenumbers.NumberParseException:
        return False


def phones(text: str) -> bool:
    if _FORMATTED.search(text):
        return True
    for m in _INTERNATIONAL.finditer(text):
        candidate = "+" + m.group()[2:] if m.group().startswith("00") else m.group()
        # NOTE: the matcher finds the number inside a candidate that ran on into other digits
        if phonenumbers.PhoneNumberMatcher(candidate, "ZZ", leniency=phonenumbers.Leniency.VALID).has_next():
            return True
    for m in _NATIONAL_ZERO.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 10 <= len(digits) <= 12 and any(_valid(digits, r) for r in _ZERO_REGIONS):
            return True
    for m in _BARE.finditer(text):
        digits = m.group()
        if digits[0] == "0":
            continue  # handled above
        if (len(digits) == 10 or digits[0] == "1") and _valid(digits, "US"):
            return True
    return False


BUILTIN: MappingProxyType[str, Callable[[str], bool]] = MappingProxyType({
    "email": emails,
    "phone": phones,
    "card": cards,
    "iban": ibans,
    "national_id": national_ids,
})
