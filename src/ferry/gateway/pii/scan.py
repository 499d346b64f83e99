"""A request body -> the PII detectors that fired, or the reason it could not be classified.

    walk the whole body (walk.collect: every string, key, number and decoded form; bounded)
      -> normalize each (normalize.normalize)
      -> run the detectors over every value alone, and over the conversation joined with " " and
         with "" (a card number in two halves, an email split at "@")

A body past a bound, with binary data, or that makes a detector raise is reported as
``scan_failed:<reason>``; the data-class policy treats that like PII (fail closed).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.gateway.pii.detectors import BUILTIN
from ferry.gateway.pii.normalize import normalize
from ferry.gateway.pii.walk import ScanBounds, ScanFailed, collect

log = logging.getLogger("ferry.gateway.pii")
SCAN_FAILED = "scan_failed"


@dataclass(frozen=True)
class ScanResult:
    """What a scan found: detector names in a stable order, ``scan_failed:<reason>`` included."""

    kinds: tuple[str, ...]
    failed: str | None = None  # the reason the body could not be classified, if it could not

    @property
    def pii(self) -> bool:
        return bool(self.kinds)


@dataclass(frozen=True)
class PiiDetector:
    """Which detectors run; ``scan`` and ``scan_body`` return the names of those that fired."""

    detectors: tuple[str, ...] = tuple(BUILTIN)
    patterns: Mapping[str, str] = field(default_factory=dict)  # name -> regex
    bounds: ScanBounds = field(default_factory=ScanBounds)

    def __post_init__(self) -> None:
        for d in self.detectors:
            if d not in BUILTIN:
                raise ValueError(f"detectors: unknown detector {d!r}")
        compiled = {name: re.compile(p) for name, p in dict(self.patterns).items()}
        object.__setattr__(self, "_compiled", compiled)

    def scan(self, texts: Iterable[str], deadline: float | None = None) -> tuple[str, ...]:
        """The detectors that fire on any of ``texts`` (each normalized first)."""
        raw = list(dict.fromkeys(t for t in texts if t))
        values = [normalize(t) for t in raw]
        return self._match([_lines(values)], [*values, *raw], deadline)

    def scan_body(self, body: Any) -> ScanResult:
        """Scan every string ``body`` carries; a body that cannot be read within bounds fails closed."""
        deadline = time.monotonic() + self.bounds.deadline_s
        try:
            text = collect(body, self.bounds, deadline)
            raw = list(dict.fromkeys(text.values))
            values = [normalize(t) for t in raw]
            in_conversation = set(text.conversation)
            parts = [normalize(t) for t in text.conversation]
            others = [v for r, v in zip(raw, values) if r not in in_conversation]
            # NOTE: each part alone (one per line), the parts joined with " " (a value split where
            # the sender put a space) and with "" (split exactly at a boundary: "jane.doe" +
            # "@example.com"); a single part is all three at once.
            joined = [_lines(parts), " ".join(parts), "".join(parts)] if len(parts) > 1 else parts
            return ScanResult(self._match([*joined, _lines(others)], [*values, *raw], deadline))
        except ScanFailed as e:
            log.warning("PII scan failed closed: %s", e)
            return ScanResult((f"{SCAN_FAILED}:{e.reason}",), e.reason)
        except Exception as e:  # NOTE: fail closed on a scanner bug too: unclassified data stays on-prem
            log.exception("PII scanner raised; the request is kept to the PII data class")
            return ScanResult((f"{SCAN_FAILED}:error",), f"error: {type(e).__name__}")

    def _match(self, segments: list[str], values: list[str], deadline: float | None) -> tuple[str, ...]:
        """Built-in detectors over the normalized segments; custom patterns over each value as well
        (normalized and raw), since a user's pattern may anchor on a value's start or end."""
        found: list[str] = []
        for name in self.detectors:
            if any(self._fires(BUILTIN[name], t, deadline) for t in segments if t):
                found.append(name)
        # NOTE: custom patterns also see the raw text: folding look-alike letters would break a
        # pattern written in Cyrillic or Greek.
        for name, rx in self._compiled.items():  # type: ignore[attr-defined]
            if any(rx.search(t) for t in (*segments, *values) if t):
                found.append(name)
        return tuple(found)

    def _fires(self, detector: Callable[[str], bool], text: str, deadline: float | None) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            raise ScanFailed("timeout", f"not matched within {self.bounds.deadline_s} s")
        return bool(detector(text))


def _lines(texts: Iterable[str]) -> str:
    """Values one per line, matched in one pass each.

    NOTE: no built-in detector's match crosses a line break (separators inside a number are spaces,
    tabs, hyphens and dots; an email has none), so this finds what matching each value alone would,
    for a fraction of the calls. Only context words (``SSN`` before nine digits) may come from the
    line before.
    """
    return "\n".join(texts)
