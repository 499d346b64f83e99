"""The table of request bodies the data-class attack tests send: personal data in every field a request
carries, split across messages and parts, and obfuscated; bodies the scanner must refuse to guess
about; and clean bodies in the same fields, which must still overflow to the cloud.

Each body is what follows ``model`` in a request; ``endpoint`` says which route it goes to.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
IBAN = "DE89 3704 0044 0532 0130 00"


@dataclass(frozen=True)
class Variant:
    id: str
    kind: str  # the detector expected in the ledger's pii_kinds ("" for clean bodies)
    body: dict[str, Any] = field(hash=False)
    endpoint: str = "chat"  # "chat" or "completions"


def user(*contents: Any) -> dict[str, Any]:
    """One user message per content (a string or a list of parts)."""
    return {"messages": [{"role": "user", "content": c} for c in contents]}


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


def tool_call(arguments: str) -> dict[str, Any]:
    return {"messages": [
        {"role": "user", "content": "book the usual"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "book", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "booked"}]}


def tool(description: str = "Book a table.", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "book", "description": description,
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": properties}}}


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


_B64 = base64.b64encode(EMAIL.encode()).decode()
_PNG = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 8).decode()
_AUDIO = base64.b64encode(bytes(range(256)) * 8).decode()
_TEXT_URI = "data:text/plain;base64," + base64.b64encode(f"card {CARD}".encode()).decode()

PII: tuple[Variant, ...] = (
    # fields the old scanner never read
    Variant("tool_call_arguments", "card", tool_call(json.dumps({"card": CARD}))),
    Variant("tool_description", "email", {**user("hi"), "tools": [tool(f"Send the receipt to {EMAIL}.")]}),
    Variant("tool_parameters", "iban", {**user("hi"), "tools": [tool(parameters={
        "type": "object", "properties": {"account": {"type": "string", "default": IBAN}}})]}),
    Variant("message_name", "email", {"messages": [{"role": "user", "name": EMAIL, "content": "hi"}]}),
    Variant("user_field", "email", {**user("hi"), "user": EMAIL}),
    Variant("metadata_value", "phone", {**user("hi"), "metadata": {"customer": "+44 20 7946 0958"}}),
    Variant("metadata_key", "email", {**user("hi"), "metadata": {EMAIL: "vip"}}),
    Variant("stop", "national_id", {**user("hi"), "stop": ["123-45-6789"]}),
    Variant("response_format_schema", "card", {**user("hi"), "response_format": schema(
        {"card": {"type": "string", "description": f"like {CARD}"}})}),
    Variant("completions_suffix", "email", {"prompt": "def owner():", "suffix": f"# owner: {EMAIL}"}, "completions"),
    Variant("completions_prompt_list", "card", {"prompt": ["hello", f"pay with {CARD}"]}, "completions"),
    Variant("content_part", "card", user(parts("hello", f"card {CARD}"))),
    Variant("future_field", "email", {**user("hi"), "x_future": {"deep": [{"notes": EMAIL}]}}),
    Variant("prediction", "email", {**user("hi"), "prediction": {"type": "content", "content": EMAIL}}),
    Variant("number_field", "card", {**user("hi"), "x_account": 4111111111111111}),
    Variant("streamed", "card", {**user(f"card {CARD}"), "stream": True}),
    # one value split in two
    Variant("card_split_messages", "card", user("my card is 4111 1111", "1111 1111")),
    Variant("card_split_parts", "card", user(parts("my card is 4111 1111 ", "1111 1111"))),
    Variant("card_split_unseparated", "card", user("41111111", "11111111")),
    Variant("email_split_messages", "email", user("write to jane.doe", "@example.com")),
    Variant("email_split_parts", "email", user(parts("write to jane.doe", "@example.com"))),
    Variant("phone_split_messages", "phone", user("call +44 20", "7946 0958")),
    Variant("card_between_number_lists", "card", user("1 2 3 4 5 6 7 8", CARD, "9 10 11 12 13 14")),
    Variant("card_split_tool_calls", "card", {"messages": [
        {"role": "user", "content": "pay"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": '{"part": "4111 1111"}'}},
            {"id": "c2", "type": "function", "function": {"name": "pay", "arguments": '{"part": "1111 1111"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "tool", "tool_call_id": "c2", "content": "ok"}]}),
    # obfuscations
    Variant("card_zero_width", "card", user("card 4111\u200b1111\u200c1111\u200d1111")),
    Variant("email_zero_width", "email", user("mail jane\u200b.doe@\u2060example\ufeff.com")),
    Variant("email_fullwidth_at", "email", user("mail jane.doe\uff20example.com")),
    Variant("email_cyrillic", "email", user("mail j\u0430ne.d\u043ee@\u0435x\u0430mple.c\u043em")),
    Variant("card_dots", "card", user("card 4111.1111.1111.1111")),
    Variant("ssn_unseparated", "national_id", user("SSN 078051120")),
    Variant("ssn_spaces", "national_id", user("my number is 078 05 1120")),
    Variant("iban_lower_case", "iban", user(f"iban {IBAN.lower()}")),
    Variant("phone_bare_10_digits", "phone", user("call me on 2025550143")),
    Variant("card_arabic_indic_digits", "card", user("card \u0664\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 "
                                                     "\u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661")),
    Variant("card_fullwidth_digits", "card", user("card \uff14\uff11\uff11\uff11\uff11\uff11\uff11\uff11"
                                                  "\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11")),
    Variant("card_soft_hyphens", "card", user("card 4111\u00ad1111\u00ad1111\u00ad1111")),
    Variant("card_amex_grouping", "card", user("amex 3782 822463 10005")),
    Variant("email_strike_through", "email", user("mail j\u0336a\u0336n\u0336e\u0336@example.com")),
    Variant("email_bracket_at_dot", "email", user("mail jane.doe [at] example (dot) com")),
    Variant("email_spelled", "email", user("mail jane dot doe at example dot com")),
    Variant("email_json_escape", "email", tool_call('{"to": "jane.doe\\u0040example.com"}')),
    Variant("email_percent_encoded", "email", {**user("hi"), "metadata": {"link": "mailto:jane.doe%40example.com"}}),
    Variant("email_html_entity", "email", user("mail jane.doe&#64;example.com")),
    Variant("email_base64", "email", {**user("hi"), "metadata": {"blob": _B64}}),
    Variant("card_text_data_uri", "card", user([{"type": "file", "file": {"file_data": _TEXT_URI}}])),
    Variant("iban_cyrillic_letters", "iban", user("iban D\u041589 3704 0044 0532 0130 00")),
    Variant("nino_lower_case", "national_id", user("NI number ab 12 34 56 c")),
    Variant("phone_international_00", "phone", user("call 0044 20 7946 0958")),
    Variant("employee_id_unicode_hyphen", "employee_id", user("badge EMP\u2010123456")),
)

# bodies the scanner cannot classify: they fail closed
UNSCANNABLE: tuple[Variant, ...] = (
    Variant("too_deep", "scan_failed:too_deep", {**user("hi"), "metadata_tree": nested(100, "leaf")}),
    Variant("too_large", "scan_failed:too_large", user("word " * 220_000)),
    Variant("inline_image", "scan_failed:binary_data", user([{"type": "text", "text": "what is this?"},
                                                              {"type": "image_url", "image_url": {"url": _PNG}}])),
    Variant("inline_audio", "scan_failed:binary_data", user([{"type": "input_audio",
                                                              "input_audio": {"data": _AUDIO, "format": "wav"}}])),
)

CLEAN: tuple[Variant, ...] = (
    Variant("prose", "", user("Summarise the plot of Hamlet in two sentences.")),
    Variant("tool_call", "", {**tool_call(json.dumps({"city": "Paris", "date": "2024-01-15", "seats": 4})),
                              "tools": [tool("Book a table in a city.", {"type": "object", "properties": {
                                  "city": {"type": "string"}, "seats": {"type": "integer", "maximum": 12}}})]}),
    Variant("metadata_user_stop", "", {**user("hi"), "metadata": {"order_id": "20240115-0042", "ts": "1718035200"},
                                       "user": "user-42", "stop": ["\n\n", "END"]}),
    Variant("response_format", "", {**user("list three fruits"), "response_format": schema(
        {"fruits": {"type": "array", "items": {"type": "string"}, "maxItems": 3}})}),
    Variant("completions_suffix", "", {"prompt": "def add(a, b):", "suffix": "    return result\n"}, "completions"),
    Variant("code", "", user("Why is `y = a @ b.T` slow for a of shape (4096, 1024)? uuid "
                             "123e4567-e89b-12d3-a456-426614174000, sha 4b825dc642cb6eb9a060e54bf8d69288fbee4904")),
    Variant("remote_image", "", user([{"type": "text", "text": "describe"},
                                      {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])),
    Variant("numbers_split", "", user("order 1234", "5678 shipped on 2024-01-15 at 12:30:45")),
    Variant("timestamps_ips_versions", "", user("At 1718035200 (2024-06-10T16:00:00Z) host 192.168.1.100 ran "
                                                "v3.11.4 and served 1,234,567 requests; p99 0.25 s; ISBN 978-3-16-148410-0")),
    Variant("streamed", "", {**user("tell me a joke"), "stream": True}),
)
