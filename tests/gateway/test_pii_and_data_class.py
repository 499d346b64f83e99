"""PII detectors with checksums, configurable patterns, and data classes that only tighten."""

from __future__ import annotations

import pytest

from ferry.gateway.config import parse_config
from ferry.gateway.data_class import DataClassPolicy, UnknownDataClass
from ferry.gateway.pii import PiiDetector, iban_ok, luhn_ok, request_texts


@pytest.mark.parametrize("text,kinds", [
    ("write to jane.doe+news@mail.example.co.uk today", ("email",)),
    ("call +44 20 7946 0958 after six", ("phone",)),
    ("call (555) 123-4567", ("phone",)),
    ("card 4111 1111 1111 1111 exp 12/29", ("card",)),
    ("card 5500-0000-0000-0004", ("card",)),
    ("IBAN GB82 WEST 1234 5698 7654 32", ("iban",)),
    ("iban DE89370400440532013000", ("iban",)),
    ("SSN 123-45-6789", ("national_id",)),
    ("NINO AB 12 34 56 C", ("national_id",)),
    ("nothing personal here, version 1.2.3, order 42, year 2024", ()),
    ("order number 4111 1111 1111 1112", ()),  # Luhn fails
    ("GB82 WEST 1234 5698 7654 33", ()),  # mod-97 fails
    ("SSN 000-12-3456", ()),  # never issued
    ("an email-like thing: a@b", ()),
])
def test_builtin_detectors(text: str, kinds: tuple[str, ...]) -> None:
    assert PiiDetector().scan([text]) == kinds


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert not iban_ok("GB82")


def test_configurable_detectors_and_patterns() -> None:
    det = PiiDetector(detectors=("card",), patterns={"employee_id": r"\bEMP-\d{6}\b"})
    assert det.scan(["mail a@example.com", "id EMP-123456"]) == ("employee_id",)
    assert det.scan(["4111111111111111"]) == ("card",)


def test_request_texts_reads_messages_parts_and_prompts() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
                         {"role": "system", "content": "b"}], "prompt": ["c", 1]}
    assert request_texts(body) == ["c", "a", "b"]


def _policy(**pii) -> DataClassPolicy:
    return DataClassPolicy(parse_config({
        "backends": [{"name": "b", "url": "http://127.0.0.1:1/v1"}],
        "models": [{"name": "m", "deployments": [{"backend": "b", "model": "x"}]}],
        "data_classes": {"public": {"locations": ["onprem", "cloud"]}, "internal": {"locations": ["onprem", "cloud"]},
                         "restricted": {"locations": ["onprem"]}},
        "pii": pii or {"enabled": True}}))


def test_data_class_only_tightens() -> None:
    p = _policy()
    clean = {"messages": [{"role": "user", "content": "hi"}]}
    assert p.decide(None, None, clean).name == "public"
    assert p.decide("internal", None, clean).name == "internal"
    assert p.decide("public", "restricted", clean).name == "restricted"
    loosened = p.decide("restricted", "public", clean)
    assert loosened.name == "restricted" and loosened.header_ignored
    pii = p.decide("public", None, {"messages": [{"role": "user", "content": "me@example.com"}]})
    assert (pii.name, pii.locations, pii.pii) == ("restricted", ("onprem",), ("email",))
    with pytest.raises(UnknownDataClass):
        p.decide(None, "secret", clean)


def test_pii_off_leaves_the_class_alone() -> None:
    p = _policy(enabled=False)
    assert p.decide(None, None, {"prompt": "me@example.com"}).name == "public"
