"""Reading request bodies strictly: ferry.openai_errors.parse_json_object, the strict request models,
the error responses that must render whatever they quote, and the request bodies in /openapi.json.

In-process and fast; tests/fuzz drives the same inputs through real servers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from ferry.openai_errors import MAX_JSON_DEPTH, OpenAIError, parse_json_object
from ferry.server.protocol import REQUEST_MODELS, ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def _refused(raw: bytes, content_type: str | None = "application/json") -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_json_object(raw, content_type)
    assert info.value.status_code == 400
    return info.value


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\\ud800"}',  # a lone high surrogate
    b'{"prompt": "x\\udc00y"}',  # a lone low surrogate
    b'{"prompt": "\\udc00\\ud800"}',  # a pair in the wrong order is two lone ones
    b'{"prompt": "\xff"}',  # not UTF-8
    b'{"temperature": NaN}',
    b'{"temperature": -Infinity}',
    b"",
    b"{not json",
])
def test_malformed_json_is_invalid_json(raw: bytes) -> None:
    assert _refused(raw).code == "invalid_json"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_deep_nesting_is_refused_without_recursion(depth: int) -> None:
    error = _refused(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    assert error.code == "invalid_json" and "nested too deeply" in error.message


@pytest.mark.parametrize("number", [b"1e999", b"-1e400", b"1" + b"0" * 400 + b".0"])
def test_numbers_that_overflow_a_float_are_refused(number: bytes) -> None:
    error = _refused(b'{"messages": [], "x": {"y": [' + number + b"]}}")
    assert error.code == "invalid_json" and "float" in error.message


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_non_json_content_types_are_refused(content_type: str) -> None:
    assert _refused(b'{"prompt": "hi"}', content_type).code == "invalid_content_type"


@pytest.mark.parametrize("content_type", [None, "", "application/json",
                                          "Application/JSON; charset=utf-8",
                                          "application/vnd.api+json"])
def test_json_bodies_are_read(content_type: str | None) -> None:
    body = (b'{"prompt": "\\ud83d\\ude00 caf\\u00e9", "n": 1e2, "seed": 123456789012345678901234,'
            b' "deep": ' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"}")
    obj = parse_json_object(body, content_type)
    assert obj["prompt"] == "\N{GRINNING FACE} café" and obj["n"] == 100.0
    assert obj["seed"] == 123456789012345678901234


def test_a_body_must_be_an_object() -> None:
    assert "JSON object" in _refused(b"[1, 2]").message


def test_an_error_quoting_a_lone_surrogate_still_renders() -> None:
    response = OpenAIError(400, "bad prompt: \ud800", param="prompt").response()
    body = bytes(response.body)
    assert body.isascii()
    assert json.loads(body)["error"]["message"] == "bad prompt: \ud800"


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("stream", 1), ("logprobs", "yes"), ("n", "2"), ("n", 2.0),
    ("max_tokens", 1.5), ("max_tokens", True), ("seed", "7"), ("ignore_eos", "true"),
    ("temperature", "0.5"), ("stop_token_ids", ["7"]), ("top_p", float("inf")),
])
def test_types_are_strict_as_in_openai(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": MSG, field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_what_the_sdk_sends_still_validates() -> None:
    req = ChatCompletionRequest.model_validate(json.loads(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        "temperature": 1, "top_p": 0.5, "n": 1, "stream": True, "stop": ["x"], "seed": 3,
        "logit_bias": {}, "stream_options": {"include_usage": True}, "logprobs": False,
        "max_completion_tokens": 5, "metadata": {"k": "v"}, "store": False})))
    assert req.stream and req.temperature == 1.0
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "logprobs": 2}).logprobs == 2


async def test_openapi_publishes_the_request_models(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for model in REQUEST_MODELS:
        assert model.__name__ in schemas
    paths = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
             "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
    for path, name in paths.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert "ChatMessage" in schemas and "TextContentPart" in schemas  # nested models too
    refs = {m for m in json.dumps(doc).split('"') if m.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)  # no dangling $ref
