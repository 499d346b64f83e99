"""A request's data class: the key's default, tightened (never loosened) by a header and by PII.

Class A is at least as strict as class B when A's allowed locations are a subset of B's. Tightening
to a class that is not at least as strict keeps the current class: a header can never widen where
data may go. A body the PII scanner cannot classify (``scan_failed:<reason>``) is tightened exactly
like one carrying PII: it fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.gateway.config import DataClassConfig, GatewayConfig
from ferry.gateway.pii import SCAN_FAILED, PiiDetector

HEADER = "x-ferry-data-class"


class UnknownDataClass(ValueError):
    pass


@dataclass(frozen=True)
class DataClassDecision:
    name: str
    locations: tuple[str, ...]
    pii: tuple[str, ...]  # detectors that fired, or ``scan_failed:<reason>``
    requested: str | None  # the header's value, if any
    header_ignored: bool  # the header asked for a looser class

    @property
    def scan_failed(self) -> bool:
        """The body could not be classified and was kept to the PII class (fail closed)."""
        return any(k.startswith(SCAN_FAILED) for k in self.pii)


class DataClassPolicy:
    def __init__(self, config: GatewayConfig) -> None:
        self._classes = {c.name: c for c in config.data_classes}
        self._default = config.default_data_class
        self._pii_class = config.pii.data_class if config.pii.enabled else None
        self._detector = (PiiDetector(config.pii.detectors, dict(config.pii.patterns))
                          if config.pii.enabled else None)

    def get(self, name: str) -> DataClassConfig:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownDataClass(f"unknown data class {name!r}, expected one of {sorted(self._classes)}") from None

    @staticmethod
    def _tighten(current: DataClassConfig, wanted: DataClassConfig) -> tuple[DataClassConfig, bool]:
        """(new class, whether it was applied)."""
        if set(wanted.locations) <= set(current.locations):
            return wanted, True
        return current, False

    def decide(self, key_default: str | None, header: str | None, body: dict[str, object]) -> DataClassDecision:
        cls = self.get(key_default or self._default)
        ignored = False
        if header:
            cls, applied = self._tighten(cls, self.get(header.strip()))
            ignored = not applied
        pii: tuple[str, ...] = ()
        if self._detector is not None and self._pii_class is not None:
            pii = self._detector.scan_body(body).kinds
            if pii:
                cls, _ = self._tighten(cls, self.get(self._pii_class))
        return DataClassDecision(cls.name, cls.locations, pii, header, ignored)
