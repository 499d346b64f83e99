"""PII detectors with checksums, configurable patterns, normalization, the whole-body walk, failing
closed, and data classes that only tighten. (The same variants through a real gateway:
test_data_class_attacks.py.)"""

from __future__ import annotations

import base64

import pytest

from ferry.gateway.config import parse_config
from ferry.gateway.data_class import DataClassPolicy, UnknownDataClass
from ferry.gateway.pii import (
    PiiDetector,
    ScanBounds,
    collect,
    iban_ok,
    luhn_ok,
    normalize,
)


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


def test_collect_reads_every_string_of_the_body() -> None:
    # NOTE: replaces the test of request_texts, the list of known fields that let the others through
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
                         {"role": "system", "content": "b", "name": "n"}], "prompt": ["c", 1],
            "tools": [{"type": "function", "function": {"name": "f", "arguments": '{"x": "d"}'}}],
            "metadata": {"k": "e"}, "stop": ["f"]}
    text = collect(body, ScanBounds(), float("inf"))
    assert {"a", "b", "c", "1", "n", "d", "e", "f", "k", "metadata", '{"x": "d"}'} <= set(text.values)
    # the conversation: free text in document order, without role/type/name, JSON strings by their values
    assert text.conversation == ("a", "b", "c", "d", "e", "f")


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


@pytest.mark.parametrize("text,kinds", [
    ("4111\u200b1111\u200b1111\u200b1111", ("card",)),  # zero-width spaces
    ("j\u0430ne@ex\u0430mple.c\u043em", ("email",)),  # Cyrillic a, o
    ("jane\uff20example\u3002com", ("email",)),  # full-width at, ideographic full stop
    ("4111.1111.1111.1111", ("card",)),
    ("3782 822463 10005", ("card",)),  # Amex 4-6-5
    ("SSN 078051120", ("national_id",)),
    ("078 05 1120", ("national_id",)),
    ("ITIN 912-70-1234", ("national_id",)),
    ("de89 3704 0044 0532 0130 00", ("iban",)),
    ("XX00 JUNK DE89370400440532013000", ("iban",)),  # a candidate before the IBAN cannot swallow it
    ("call me on 2025550143", ("phone",)),
    ("ring 07911 123456", ("phone",)),
    ("jane [at] example [dot] com", ("email",)),
    ("j\u0336a\u0336n\u0336e\u0336@example.com", ("email",)),  # combining strike-through
])
def test_obfuscated_values_are_found(text: str, kinds: tuple[str, ...]) -> None:
    assert PiiDetector().scan([text]) == kinds


# NOTE: ordinary prose, code and numbers: none of these may make a request restricted.
NEGATIVES = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(a, b):\n    return a @ b.T  # matmul",
    "@app.get('/users/{id}')\nasync def get(id: int): ...",
    "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "unix time 1700000000, in ms 1718035200123",
    "2024-01-15T12:30:45Z and 2024-01-15 12:30:45.123456 and 2025-06-30T23:59:59+02:00",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904",
    "order #20240115-0042, invoice INV-2024-000123, order 123456789",
    "order id 9876543210123",
    "version 3.11.4 on 127.0.0.1 and 192.168.1.100, IPv6 2001:db8::ff00:42:8329",
    "price $1,234,567.89; ISBN 978-3-16-148410-0",
    "pi = 3.14159265358979323846; 0.5 0.25 0.125 0.0625 0.03125",
    "lat/lon 48.8566, 2.3522; MAC 00:1A:2B:3C:4D:5E",
    "ports 5432 6379 5672 8080",
    "tracking 1Z999AA10123456784",
    "Call 911 or go to room 404",
    "user@localhost, foo@bar, ping @alice",
    "git clone git@github.com:org/repo.git",
    "look at this dot plot; we met at noon",
    "See RFC 5322 section 3.4.1",
    "COVID19 H264 MP3 x86_64 sha256 utf8",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_ordinary_text_is_not_personal_data(text: str) -> None:
    assert PiiDetector().scan([text]) == ()


def test_normalize_removes_invisibles_and_folds_look_alikes() -> None:
    assert normalize("a\u200bb\u00adc\u2060d\ufeffe") == "abcde"
    assert normalize("\u0441\u043e\u0440\u0443") == "copy"  # Cyrillic
    assert normalize("\uff14\uff11 \u0664\u0661") == "41 41"  # full-width, Arabic-Indic digits
    assert normalize("caf\u00e9 \u2013 ok") == "cafe - ok"
    assert normalize("plain ascii\nstays") == "plain ascii\nstays"


def test_scan_body_fails_closed_past_its_bounds() -> None:
    tight = PiiDetector(bounds=ScanBounds(max_depth=4, max_chars=100, max_values=10))
    assert tight.scan_body({"a": {"b": {"c": {"d": {"e": "x"}}}}}).kinds == ("scan_failed:too_deep",)
    assert tight.scan_body({"a": "x" * 101}).kinds == ("scan_failed:too_large",)
    assert tight.scan_body({"a": list("abcdefghijk")}).kinds == ("scan_failed:too_many_values",)
    assert tight.scan_body({"a": "fine"}).kinds == ()
    with pytest.raises(ValueError):
        ScanBounds(max_depth=0)


def test_a_scanner_error_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str) -> str:
        raise RuntimeError("detector bug")

    monkeypatch.setattr("ferry.gateway.pii.scan.normalize", broken)
    decision = _policy().decide(None, None, {"messages": [{"role": "user", "content": "hi"}]})
    assert (decision.name, decision.pii, decision.scan_failed) == ("restricted", ("scan_failed:error",), True)


def test_a_timeout_fails_closed() -> None:
    slow = PiiDetector(bounds=ScanBounds(deadline_s=1e-9))
    assert slow.scan_body({"messages": [{"role": "user", "content": "hello"}]}).kinds == ("scan_failed:timeout",)


def test_long_runs_of_a_small_alphabet_are_text_not_binary_data() -> None:
    det = PiiDetector()
    dna = "\n".join(["ACGTTGCAAGCTTAGC" * 5] * 40)  # FASTA-like, 3,000+ characters
    hexdump = "9f86d081884c7d659a2feaa0c55ad015" * 64
    assert det.scan_body({"messages": [{"role": "user", "content": dna}], "x": hexdump}).kinds == ()
    noise = base64.b64encode(bytes(range(256)) * 4).decode()
    assert det.scan_body({"x": noise}).kinds == ("scan_failed:binary_data",)
