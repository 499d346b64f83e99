"""Schemathesis over the OpenAPI documents of `ferry serve` and `ferry gateway`: no 5xx, ever.

Each server is a live one on 127.0.0.1 (the tiny model behind `ferry serve`, a fixed-answer
upstream behind the gateway), fuzzed through Schemathesis' Python API. For every operation of its
``/openapi.json``: positive cases (what the schema allows), negative ones (what it forbids), and,
for operations with a JSON body, hostile ones (a positive body broken by ``fuzz.hostile``: lone
surrogates, deep nesting, overflowing numbers, NaN, strings for scalars, a text/plain label).
Every answer must be below 500, and every 4xx must be in OpenAI's error shape (Anthropic's on the
gateway's ``/v1/messages``, which speaks Anthropic's API).

Bounded so that it fits in ``make test``: at most ``FERRY_FUZZ_EXAMPLES`` examples per operation
and mode (derandomized: the same cases each run, unless ``FERRY_FUZZ_RANDOM=1``), and
``FERRY_FUZZ_BUDGET_S`` seconds per server, shared out between the operations; a case past its
share is generated but not sent. Shrinking is off: each failure is reported with what reproduces
it, and all are listed at once.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import requests
import schemathesis
from ferry_server import ServerProcess
from fuzz.conftest import AUTH, SERVE_MODEL
from fuzz.hostile import mutate
from gateway.conftest import GatewayHarness
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

MAX_EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "40"))
BUDGET_S = float(os.environ.get("FERRY_FUZZ_BUDGET_S", "60"))
# NOTE: derandomized by default, so `make test` sends the same cases each run; FERRY_FUZZ_RANDOM=1
# (with a larger budget) hunts for new ones.
DERANDOMIZE = os.environ.get("FERRY_FUZZ_RANDOM", "") != "1"
MODES = ("positive", "negative", "hostile")
REQUEST_TIMEOUT_S = 60.0


@dataclass
class FuzzReport:
    sent: int = 0
    skipped: int = 0  # generated past the operation's time share
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)  # operations without a negative case

    def summary(self) -> str:
        codes = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.sent} cases sent ({self.skipped} skipped past the budget); statuses {codes}; "
                f"{len(self.failures)} failures; no negative case for {', '.join(self.no_negative)}")

    def record(self, status: int, content: bytes, repro: str, path: str) -> None:
        self.sent += 1
        self.statuses[status] += 1
        anthropic = path.endswith("/v1/messages")
        if status >= 500:
            self.failures.append(f"{status} {content[:300]!r}: {repro}")
        elif status >= 400 and not (_anthropic_shaped(content) if anthropic else _openai_shaped(content)):
            api = "Anthropic's" if anthropic else "OpenAI's"
            self.failures.append(f"{status} not in {api} error shape {content[:300]!r}: {repro}")


def _openai_shaped(content: bytes) -> bool:
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def _anthropic_shaped(content: bytes) -> bool:
    try:
        body = json.loads(content)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (body.get("type") == "error" and isinstance(error, dict)
            and set(error) == {"type", "message"} and all(isinstance(v, str) for v in error.values()))


@dataclass(frozen=True)
class Target:
    """The server under fuzz: where it is, the model positive bodies name, the headers to send."""

    base_url: str
    model: str
    headers: dict[str, str]
    session: requests.Session


def _send(target: Target, case: Case, report: FuzzReport) -> None:
    repro = case.as_curl_command(headers=target.headers, base_url=target.base_url)
    try:
        response = case.call(base_url=target.base_url, session=target.session,
                             headers=target.headers, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        report.failures.append(f"no answer ({type(exc).__name__}: {exc}): {repro}")
        return
    report.record(response.status_code, response.content, repro, case.path)


def _send_raw(target: Target, path: str, what: str, raw: bytes, content_type: str,
              report: FuzzReport) -> None:
    repro = f"POST {path} ({what}, Content-Type {content_type}): {raw[:200]!r}"
    try:
        response = target.session.post(target.base_url + path, data=raw, timeout=REQUEST_TIMEOUT_S,
                                       headers={**target.headers, "Content-Type": content_type})
    except requests.RequestException as exc:
        report.failures.append(f"no answer ({type(exc).__name__}: {exc}): {repro}")
        return
    report.record(response.status_code, response.content, repro, path)


def _with_model(body: Any, model: str) -> Any:
    # NOTE: a generated model name would make nearly every case a 404 that never reaches the code
    # behind it; negative cases keep whatever was generated.
    if isinstance(body, dict) and "model" in body:
        return {**body, "model": model}
    return body


def _run_slot(target: Target, operation: Any, mode: str, share_end: float,
              report: FuzzReport) -> None:
    """Up to MAX_EXAMPLES cases of one operation in one mode, sent until ``share_end``."""
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=generation), data=st.data())
    def run(case: Case, data: st.DataObject) -> None:
        if time.monotonic() > share_end:
            report.skipped += 1
            return
        if mode == "hostile":
            if not isinstance(case.body, dict):
                return  # NOTE: every POST body here is a JSON object; nothing else to break
            what, raw, content_type = mutate(_with_model(case.body, target.model), data)
            _send_raw(target, case.formatted_path, what, raw, content_type, report)
            return
        if mode == "positive":
            case.body = _with_model(case.body, target.model)
        _send(target, case, report)

    try:
        run()
    except Unsatisfiable:
        # NOTE: an operation with no parameter and no body (GET /health) has nothing to break.
        if mode != "negative":
            raise
        report.no_negative.append(f"{operation.method.upper()} {operation.path}")


def fuzz(base_url: str, *, model: str, headers: dict[str, str] | None = None,
         path_regex: str = ".*", document: dict[str, Any] | None = None) -> FuzzReport:
    """Fuzz every operation of ``base_url``'s OpenAPI document whose path matches ``path_regex``.

    ``document`` replaces the server's own (to fuzz an older server by today's schemas).
    """
    schema = (schemathesis.openapi.from_dict(document) if document is not None
              else schemathesis.openapi.from_url(base_url + "/openapi.json"))
    schema = schema.include(path_regex=path_regex)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the OpenAPI document lists no operation"
    report = FuzzReport()
    slots = [(op, mode) for mode in MODES for op in operations
             if mode != "hostile" or op.method.upper() == "POST"]
    end = time.monotonic() + BUDGET_S
    with requests.Session() as session:
        target = Target(base_url, model, headers or {}, session)
        for i, (operation, mode) in enumerate(slots):
            # NOTE: each slot gets an even share of what is left, so a fast one leaves more to others.
            share_end = time.monotonic() + max(0.0, end - time.monotonic()) / (len(slots) - i)
            _run_slot(target, operation, mode, share_end, report)
    return report


def _assert_clean(name: str, report: FuzzReport) -> None:
    print(f"\n{name}: {report.summary()}")
    assert report.sent > 0
    assert not report.failures, f"{name}: {report.summary()}\n" + "\n".join(report.failures[:30])


def test_openapi_documents_describe_the_request_bodies(tiny_serve: ServerProcess,
                                                        gateway_over_echo: GatewayHarness) -> None:
    for url, bodies in ((tiny_serve.base_url, ("/v1/chat/completions", "/v1/completions",
                                               "/tokenize", "/detokenize")),
                        (gateway_over_echo.url, ("/v1/chat/completions", "/v1/completions"))):
        doc = httpx.get(url + "/openapi.json", timeout=30).json()
        schemas = doc["components"]["schemas"]
        for path in bodies:
            ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rsplit("/", 1)[1]
            properties: dict[str, Any] = schemas[name]["properties"]
            assert "model" in properties or path == "/detokenize", (url, path, name)
    serve_schemas = httpx.get(tiny_serve.base_url + "/openapi.json").json()["components"]["schemas"]
    chat = serve_schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and chat["properties"]["stream"]["type"] == "boolean"


def test_fuzz_ferry_serve(tiny_serve: ServerProcess) -> None:
    _assert_clean("ferry serve", fuzz(tiny_serve.base_url, model=SERVE_MODEL))


def test_fuzz_ferry_gateway(gateway_over_echo: GatewayHarness) -> None:
    # NOTE: the OpenAI endpoints and the probes; the admin API is not an OpenAI endpoint.
    _assert_clean("ferry gateway", fuzz(gateway_over_echo.url, model="chat", headers=AUTH,
                                        path_regex=r"^/(v1/|health|metrics)"))
