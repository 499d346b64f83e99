"""PII detection over a whole request body: emails, phone numbers, card numbers, IBANs, national ids,
custom patterns; after Unicode normalization, over each value and the joined conversation, failing
closed when a body cannot be read within bounds.

    walk.py        every string a body carries (keys, numbers, JSON in strings, decoded forms), bounded
    decode.py      percent-encoding, HTML entities, base64 and data: URIs; binary data is ``Opaque``
    normalize.py   NFKD, invisible characters out, look-alike letters folded (confusables.py)
    detectors.py   the built-in detectors (python-stdnum, phonenumbers, ferry's rules)
    scan.py        PiiDetector: scan(texts) and scan_body(body) -> ScanResult
"""

from __future__ import annotations

from ferry.gateway.pii.detectors import BUILTIN, iban_ok, luhn_ok
from ferry.gateway.pii.normalize import normalize
from ferry.gateway.pii.scan import SCAN_FAILED, PiiDetector, ScanResult
from ferry.gateway.pii.walk import ScanBounds, ScanFailed, collect

__all__ = ["BUILTIN", "SCAN_FAILED", "PiiDetector", "ScanBounds", "ScanFailed", "ScanResult", "collect", "iban_ok",
           "luhn_ok", "normalize"]
