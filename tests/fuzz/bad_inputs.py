"""Hostile request bodies that once cost a 500 (or a coerced 200), and a keep-alive check.

Each ``BadInput`` must get a 400 in OpenAI's error shape, and the same TCP connection must then
serve a good request: a server that answered 500 from an unhandled exception also dropped the
connection (uvicorn closes it once the app raises after its response started).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LONE_SURROGATES = ("\ud800", "\udfff")


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    body: bytes
    content_type: str = "application/json"
    param: str | None = None  # the error's expected param (None: not checked)
    code: str | None = None  # the error's expected code (None: not checked)


def raw(obj: Any) -> bytes:
    """JSON bytes; json.dumps writes a lone surrogate as its \\uXXXX escape, as a client would."""
    return json.dumps(obj).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def bad_inputs(model: str, *, tokenize: bool) -> list[BadInput]:
    """The inputs of the issue, for a server whose model is ``model`` (``tokenize``: /tokenize too)."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": model, "prompt": "hi", "max_tokens": 2}
    cases = [
        BadInput("surrogate-chat", CHAT, raw({**chat, "messages": [
            {"role": "user", "content": f"a{LONE_SURROGATES[0]}b"}]}), code="invalid_json"),
        BadInput("surrogate-completions", COMPLETIONS, raw({**comp, "prompt": LONE_SURROGATES[1]}),
                 code="invalid_json"),
        BadInput("nested-5k-field", CHAT, raw(chat)[:-1] + b', "metadata": ' + nested(5_000) + b"}",
                 code="invalid_json"),
        BadInput("nested-100k-body", COMPLETIONS, nested(100_000), code="invalid_json"),
        BadInput("stream-yes-chat", CHAT, raw({**chat, "stream": "yes"}), param="stream"),
        BadInput("stream-yes-completions", COMPLETIONS, raw({**comp, "stream": "yes"}), param="stream"),
        BadInput("logprobs-yes-chat", CHAT, raw({**chat, "logprobs": "yes"}), param="logprobs"),
        # NOTE: completions' logprobs is an integer: "yes" never passed, but lax parsing took true as 1.
        BadInput("logprobs-true-completions", COMPLETIONS, raw({**comp, "logprobs": True}),
                 param="logprobs"),
        BadInput("text-plain", CHAT, raw(chat), content_type="text/plain", code="invalid_content_type"),
    ]
    if tokenize:
        cases.append(BadInput("surrogate-tokenize", "/tokenize",
                              raw({"prompt": f"x{LONE_SURROGATES[0]}"}), code="invalid_json"))
    return cases


def stop_token_id_inputs(model: str, vocab_size: int) -> list[BadInput]:
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": model, "prompt": "hi", "max_tokens": 2}
    return [
        BadInput("stop-id-at-vocab-size", COMPLETIONS, raw({**comp, "stop_token_ids": [vocab_size]}),
                 param="stop_token_ids"),
        # NOTE: min_tokens makes the sampler ban the stop ids, the path that indexes the logits.
        BadInput("stop-id-huge-with-min-tokens", CHAT,
                 raw({**chat, "stop_token_ids": [10**30], "min_tokens": 1}), param="stop_token_ids"),
    ]


def _exchange(conn: http.client.HTTPConnection, path: str, body: bytes,
              headers: dict[str, str]) -> tuple[int, bytes, bool]:
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp.will_close


def assert_400_then_served(port: int, case: BadInput, good_path: str, good_body: bytes,
                           headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST ``case``, expect an OpenAI-shaped 400, then a 200 for the good body on the same
    connection; returns the error object."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        status, payload, closing = _exchange(conn, case.path, case.body,
                                             {"Content-Type": case.content_type, **(headers or {})})
        assert status == 400, (case.name, status, payload[:500])
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"}, (case.name, error)
        assert error["type"] == "invalid_request_error" and error["message"], (case.name, error)
        if case.param is not None:
            assert error["param"] == case.param, (case.name, error)
        if case.code is not None:
            assert error["code"] == case.code, (case.name, error)
        assert not closing, f"{case.name}: the server asked to close the connection"
        sock = conn.sock
        status, payload, _ = _exchange(conn, good_path, good_body,
                                       {"Content-Type": "application/json", **(headers or {})})
        assert conn.sock is sock, f"{case.name}: the good request needed a new connection"
        assert status == 200, (case.name, status, payload[:500])
        return dict(error)
    finally:
        conn.close()
