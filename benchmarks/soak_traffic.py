"""What the soak test's clients send through the gateway, and how each request ended.

Every request is one of the kinds in ``KINDS`` (chosen at random by weight). Its prompt starts with a
tag, ``[soak-public-000042]`` or ``[soak-restricted-000042]``, which says whether the request may
leave on-prem: the cloud recorder (``soak_cloud.py``) finds these tags, so a restricted request that
reached the cloud is counted at the cloud. Restricted requests carry a restricted key, the
``x-ferry-data-class: restricted`` header, or one of the ``PLANTED_PII`` values.

Each request comes back as a ``Result``: an outcome label (``200``, ``http_<status>``, the bench
client's error kinds, ``client_closed`` for a deliberate disconnect) and whether the gateway must
have seen it (``reached``: ``yes``, ``maybe`` when the client left before any answer, ``no`` when it
could not connect), which the ledger check uses.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from ferry.bench.client import (
    BAD_RESPONSE,
    CONNECT_ERROR,
    DISCONNECTED,
    TIMEOUT,
    RequestResult,
    SendOptions,
    Target,
    send_request,
)
from ferry.bench.workload import (
    RequestSpec,
    WorkloadConfig,
    iter_requests,
    synthetic_prompt,
)
from ferry.sse import SSEError, aiter_sse_data

# NOTE: one value per detector the gateway has (and the custom pattern the soak configures), in the
# formats the detectors document; the cloud recorder looks for each of them in every body it gets.
PLANTED_PII = {
    "email": "jane.doe@example.com",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "ssn": "123-45-6789",
    "nino": "AB 12 34 56 C",
    "employee_id": "EMP-123456",
}
EMPLOYEE_ID_PATTERN = r"\bEMP-\d{6}\b"

# kind -> weight (share of requests). Restricted kinds must never reach the cloud.
# NOTE: about a fifth of the requests are restricted (these kinds, and half of the disconnects and
# over-long prompts); they may only use the small on-prem replica, so more would only queue there.
KINDS: dict[str, float] = {
    "public_stream": 30, "public_json": 8, "public_completions": 6,
    "restricted_header": 5, "restricted_key": 3, "loosen_header": 1, "pii": 7,
    "disconnect": 12, "malformed": 9, "over_long": 4, "bad_key": 2, "rate_limited": 7,
}
RESTRICTED_KINDS = frozenset({"restricted_header", "restricted_key", "loosen_header", "pii"})
HEADER = "x-ferry-data-class"

# outcome labels of our own (the rest are "200", "http_<status>" and ferry.bench.client's error kinds)
CLIENT_CLOSED = "client_closed"  # the client hung up on purpose
UNEXPECTED_200 = "unexpected_200"  # a malformed or over-long request that was served


@dataclass(frozen=True)
class Keys:
    """Virtual keys: default class (public), restricted class, and one with a small RPM limit."""

    public: str
    restricted: str
    limited: str


@dataclass(frozen=True)
class Result:
    kind: str
    variant: str
    restricted: bool  # the tag said restricted: this request must never reach the cloud
    start: float  # seconds since the soak's load started
    end: float
    outcome: str
    reached: str  # "yes" | "maybe" | "no": must the gateway have a ledger row for it?
    detail: str | None = None

    @property
    def server_failure(self) -> bool:
        """An answer that is the server side's fault: a 5xx, an in-band error, a broken stream."""
        return (self.outcome.startswith("http_5") or self.outcome in ("stream_error", "stream_cut", DISCONNECTED,
                                                                       BAD_RESPONSE))

    @property
    def capacity_shed(self) -> bool:
        """A restricted request answered 503 because on-prem, the only place it may go, stayed full.

        NOTE: by design (docs/gateway.md: it waits up to queue_timeout, then 503 naming each
        deployment's state), not a fault; a slot that leaked would show in the idle checks instead.
        A public request has the cloud's room too, so its 503 is never shedding.
        """
        return (self.restricted and self.outcome == "http_503" and "in flight)" in (self.detail or "")
                and "down" not in (self.detail or ""))


@dataclass(frozen=True)
class SoakTarget(Target):
    """A bench ``Target`` that also sends the data-class header (or any other)."""

    extra_headers: tuple[tuple[str, str], ...] = ()

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **dict(self.extra_headers)}


_ANSWERED = ("200", "stream_error", "stream_cut", BAD_RESPONSE, UNEXPECTED_200)


def _reached_for(outcome: str) -> str:
    """Whether the gateway must have a ledger row, from how the request ended (see ``Result.reached``)."""
    if outcome in _ANSWERED or outcome.startswith("http_"):
        return "yes"  # NOTE: a status line came back, so the gateway handled the request
    if outcome == CONNECT_ERROR:
        return "no"
    return "maybe"  # NOTE: timeouts, early closes: the gateway may or may not have read the request


@dataclass
class Traffic:
    """Builds and sends requests of every kind; one instance shared by all clients (one event loop)."""

    client: httpx.AsyncClient
    base_url: str  # the gateway, ending in /v1
    model: str  # the gateway's public model name
    keys: Keys
    t0: float  # time.monotonic() when the load started
    max_tokens: int
    timeout_s: float
    over_long_tokens: int  # an over-long prompt's size, past the on-prem context
    seed: int = 0
    _seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _specs: Iterator[RequestSpec] | None = None
    _long_text: str = ""

    def __post_init__(self) -> None:
        self._specs = iter_requests(WorkloadConfig(dataset="builtin", seed=self.seed, num_requests=1))
        self._long_text = synthetic_prompt(self.over_long_tokens, random.Random(self.seed))

    # ---- building blocks ---------------------------------------------------------------------------

    def _tag(self, restricted: bool) -> str:
        return f"[soak-{'restricted' if restricted else 'public'}-{next(self._seq):06d}]"

    def _spec(self, rng: random.Random, tag: str) -> RequestSpec:
        assert self._specs is not None  # NOTE: set in __post_init__
        spec = next(self._specs)
        messages = spec.messages or ({"role": "user", "content": spec.prompt or ""},)
        first = dict(messages[0], content=f"{tag} {messages[0]['content']}")
        return RequestSpec(max_tokens=rng.randint(4, max(4, min(spec.max_tokens, self.max_tokens))),
                           messages=(first, *messages[1:]))

    def _target(self, key: str, endpoint: str = "chat", header: str | None = None) -> SoakTarget:
        return SoakTarget(base_url=self.base_url, label="gateway", model=self.model, endpoint=endpoint,
                          api_key=key, extra_headers=((HEADER, header),) if header else ())

    def _result(self, kind: str, variant: str, restricted: bool, start: float, outcome: str,
                detail: str | None = None, reached: str | None = None) -> Result:
        return Result(kind, variant, restricted, start - self.t0, time.monotonic() - self.t0, outcome,
                      reached or _reached_for(outcome), detail)

    async def _bench_stream(self, kind: str, variant: str, restricted: bool, target: Target, spec: RequestSpec,
                            rng: random.Random) -> Result:
        """A streamed request through ferry's bench client (TTFT, usage, error kinds)."""
        start = time.monotonic()
        opts = SendOptions(temperature=0.0, request_usage=rng.random() < 0.7, timeout_s=self.timeout_s)
        res: RequestResult = await send_request(self.client, target, spec, opts)
        outcome = "200" if res.ok else (res.error_kind or "unknown")
        return self._result(kind, variant, restricted, start, outcome, res.error)

    async def _post(self, kind: str, variant: str, restricted: bool, path: str, content: bytes,
                    headers: dict[str, str]) -> Result:
        """A non-streamed POST of raw bytes; the outcome is its status (or what broke)."""
        start = time.monotonic()
        try:
            resp = await self.client.post(self.base_url + path, content=content, timeout=self.timeout_s,
                                          headers={"content-type": "application/json", **headers})
        except httpx.ConnectError as e:
            return self._result(kind, variant, restricted, start, CONNECT_ERROR, str(e))
        except httpx.TimeoutException as e:
            return self._result(kind, variant, restricted, start, TIMEOUT, f"{type(e).__name__}: {e}")
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            return self._result(kind, variant, restricted, start, DISCONNECTED, f"{type(e).__name__}: {e}")
        if resp.status_code != 200:
            return self._result(kind, variant, restricted, start, f"http_{resp.status_code}", resp.text[:300])
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            ok = "[DONE]" in resp.text  # NOTE: a streamed answer read whole (an over-long prompt that was served)
        else:
            try:
                ok = isinstance(resp.json().get("choices"), list)
            except (ValueError, AttributeError):
                ok = False
        return self._result(kind, variant, restricted, start, "200" if ok else BAD_RESPONSE,
                            None if ok else resp.text[:300])

    def _auth(self, key: str, header: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **({HEADER: header} if header else {})}

    # ---- the kinds -----------------------------------------------------------------------------------

    async def public_stream(self, rng: random.Random) -> Result:
        return await self._bench_stream("public_stream", "chat", False, self._target(self.keys.public),
                                        self._spec(rng, self._tag(False)), rng)

    async def public_completions(self, rng: random.Random) -> Result:
        spec = self._spec(rng, self._tag(False))
        spec = RequestSpec(max_tokens=spec.max_tokens, prompt=spec.text())
        return await self._bench_stream("public_completions", "completions", False,
                                        self._target(self.keys.public, "completions"), spec, rng)

    async def public_json(self, rng: random.Random) -> Result:
        spec = self._spec(rng, self._tag(False))
        body = {"model": self.model, **spec.body("chat"), "max_tokens": spec.max_tokens, "temperature": 0}
        return await self._post("public_json", "chat", False, "/chat/completions", json.dumps(body).encode(),
                                self._auth(self.keys.public))

    async def restricted_header(self, rng: random.Random) -> Result:
        return await self._bench_stream("restricted_header", "chat", True,
                                        self._target(self.keys.public, header="restricted"),
                                        self._spec(rng, self._tag(True)), rng)

    async def restricted_key(self, rng: random.Random) -> Result:
        return await self._bench_stream("restricted_key", "chat", True, self._target(self.keys.restricted),
                                        self._spec(rng, self._tag(True)), rng)

    async def loosen_header(self, rng: random.Random) -> Result:
        """A restricted key asking for ``public`` by header: the class must stay restricted."""
        return await self._bench_stream("loosen_header", "chat", True,
                                        self._target(self.keys.restricted, header="public"),
                                        self._spec(rng, self._tag(True)), rng)

    async def rate_limited(self, rng: random.Random) -> Result:
        return await self._bench_stream("rate_limited", "chat", False, self._target(self.keys.limited),
                                        self._spec(rng, self._tag(False)), rng)

    async def pii(self, rng: random.Random) -> Result:
        """A public key, but PII somewhere in the body: in a message, a text part, a system turn, a prompt."""
        detector, value = rng.choice(sorted(PLANTED_PII.items()))
        tag = self._tag(True)
        n = rng.randint(4, self.max_tokens)
        variant = rng.choice(("user", "parts", "system", "history", "completions"))
        ask = f"{tag} Draft a short, polite reply to the customer whose {detector} is {value}."
        if variant == "completions":
            body: dict[str, Any] = {"prompt": ask}
        elif variant == "parts":
            body = {"messages": [{"role": "user", "content": [{"type": "text", "text": f"{tag} Summarize:"},
                                                               {"type": "text", "text": f"the {detector} {value}"}]}]}
        elif variant == "system":
            body = {"messages": [{"role": "system", "content": f"The customer's {detector} is {value}."},
                                 {"role": "user", "content": f"{tag} Write them a greeting."}]}
        elif variant == "history":
            body = {"messages": [{"role": "user", "content": f"{tag} Remember this: {value}"},
                                 {"role": "assistant", "content": "Noted."},
                                 {"role": "user", "content": "Now tell me a joke."}]}
        else:
            body = {"messages": [{"role": "user", "content": ask}]}
        stream = rng.random() < 0.5
        body.update(model=self.model, max_tokens=n, temperature=0, stream=stream)
        path = "/completions" if variant == "completions" else "/chat/completions"
        label = f"{variant}/{detector}"
        if not stream:
            return await self._post("pii", label, True, path, json.dumps(body).encode(), self._auth(self.keys.public))
        return await self._read_stream("pii", label, True, path, body, self._auth(self.keys.public), None)

    async def bad_key(self, rng: random.Random) -> Result:
        spec = self._spec(rng, self._tag(False))
        body = {"model": self.model, **spec.body("chat"), "max_tokens": spec.max_tokens}
        return await self._post("bad_key", "wrong key", False, "/chat/completions", json.dumps(body).encode(),
                                self._auth("sk-ferry-not-a-key"))

    async def over_long(self, rng: random.Random) -> Result:
        """A prompt past the context window, public or restricted: it must be refused with a 4xx."""
        restricted = rng.random() < 0.5
        tag = self._tag(restricted)
        body = {"model": self.model, "messages": [{"role": "user", "content": f"{tag} {self._long_text}"}],
                "max_tokens": 8, "stream": rng.random() < 0.5}
        headers = self._auth(self.keys.public, "restricted" if restricted else None)
        result = await self._post("over_long", "restricted" if restricted else "public", restricted,
                                  "/chat/completions", json.dumps(body).encode(), headers)
        return _flag_served(result)

    async def malformed(self, rng: random.Random) -> Result:
        """A body the gateway or the backend must refuse with a 4xx; never a 5xx, never a 200."""
        variant, content, header = _malformed_body(rng.randrange(len(MALFORMED)), self.model, self._tag(False))
        result = await self._post("malformed", variant, False, "/chat/completions", content,
                                  self._auth(self.keys.public, header))
        return _flag_served(result)

    async def disconnect(self, rng: random.Random) -> Result:
        """The client hangs up: before the answer, after a few streamed events, or while waiting for JSON."""
        restricted = rng.random() < 0.5
        tag = self._tag(restricted)
        spec = self._spec(rng, tag)
        mode = rng.choice(("before_answer", "mid_stream", "json_wait"))
        body = {"model": self.model, **spec.body("chat"), "max_tokens": max(spec.max_tokens, 16),
                "temperature": 0, "stream": mode != "json_wait"}
        headers = self._auth(self.keys.public, "restricted" if restricted else None)
        label = f"{mode}/{'restricted' if restricted else 'public'}"
        if mode == "mid_stream":
            return await self._read_stream("disconnect", label, restricted, "/chat/completions", body, headers,
                                           rng.randint(1, 6))
        return await self._hang_up("disconnect", label, restricted, body, headers, rng.uniform(0.05, 2.0))

    # ---- streams read by hand (disconnects, bodies the bench client cannot build) -------------------

    async def _read_stream(self, kind: str, variant: str, restricted: bool, path: str, body: dict[str, Any],
                           headers: dict[str, str], close_after: int | None) -> Result:
        """Stream ``body``; hang up after ``close_after`` data events (None: read to the end)."""
        start = time.monotonic()
        events = 0
        got_headers = False

        def result(outcome: str, detail: str | None = None, reached: str | None = None) -> Result:
            return self._result(kind, variant, restricted, start, outcome, detail, reached)

        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.stream("POST", self.base_url + path, json=body, headers=headers) as resp:
                    got_headers = True
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode("utf-8", "replace")[:300]
                        return result(f"http_{resp.status_code}", text)
                    async with aclosing(aiter_sse_data(resp)) as payloads:
                        async for data in payloads:
                            events += 1
                            what = _event_kind(data)
                            if what == "done":
                                return result("200")
                            if what != "chunk":
                                return result("stream_error" if what == "error" else BAD_RESPONSE, data[:300])
                            if close_after is not None and events >= close_after:
                                # NOTE: leaving the `async with` closes the connection mid-stream.
                                return result(CLIENT_CLOSED, f"after {events} events", "yes")
            return result("stream_cut", f"no [DONE] after {events} events")
        except (TimeoutError, httpx.TimeoutException):
            return result(TIMEOUT, f"no complete answer in {self.timeout_s:g}s")
        except httpx.ConnectError as e:
            return result(CONNECT_ERROR, str(e))
        except SSEError as e:  # NOTE: an httpx.HTTPError too, so before the transport errors
            return result(BAD_RESPONSE, f"not an event stream: {e}")
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            return result("stream_cut" if got_headers else DISCONNECTED, f"{type(e).__name__}: {e}")

    async def _hang_up(self, kind: str, variant: str, restricted: bool, body: dict[str, Any],
                       headers: dict[str, str], after_s: float) -> Result:
        """Send ``body`` and hang up after ``after_s`` seconds unless the answer is complete by then."""
        start = time.monotonic()
        got_headers = False

        async def exchange() -> Result:
            nonlocal got_headers
            async with self.client.stream("POST", self.base_url + "/chat/completions", json=body,
                                          headers=headers) as resp:
                got_headers = True
                raw = await resp.aread()
            outcome = "200" if resp.status_code == 200 else f"http_{resp.status_code}"
            detail = None if resp.status_code == 200 else raw[:300].decode("utf-8", "replace")
            return self._result(kind, variant, restricted, start, outcome, detail)

        try:
            return await asyncio.wait_for(exchange(), timeout=after_s)
        except TimeoutError:
            return self._result(kind, variant, restricted, start, CLIENT_CLOSED, f"after {after_s:.2f}s",
                                reached="yes" if got_headers else "maybe")
        except httpx.TimeoutException as e:
            return self._result(kind, variant, restricted, start, TIMEOUT, f"{type(e).__name__}: {e}")
        except httpx.ConnectError as e:
            return self._result(kind, variant, restricted, start, CONNECT_ERROR, str(e))
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            outcome = "stream_cut" if got_headers else DISCONNECTED
            return self._result(kind, variant, restricted, start, outcome, f"{type(e).__name__}: {e}")

    async def one(self, kind: str, rng: random.Random) -> Result:
        result: Result = await getattr(self, kind)(rng)
        return result


# ---- malformed bodies: (variant, raw bytes, data-class header) -----------------------------------------

MALFORMED = ("not_json", "truncated_json", "json_array", "empty", "binary", "missing_model", "unknown_model",
             "messages_not_list", "bad_role", "negative_max_tokens", "temperature_5", "stream_options_string",
             "unknown_data_class")


def _malformed_body(i: int, model: str, tag: str) -> tuple[str, bytes, str | None]:
    variant = MALFORMED[i]
    user = [{"role": "user", "content": f"{tag} hello"}]
    bodies: dict[str, Any] = {
        "missing_model": {"messages": user},
        "unknown_model": {"model": "no-such-model", "messages": user},
        "messages_not_list": {"model": model, "messages": f"{tag} hello"},
        "bad_role": {"model": model, "messages": [{"role": "wizard", "content": f"{tag} hello"}]},
        "negative_max_tokens": {"model": model, "messages": user, "max_tokens": -5},
        "temperature_5": {"model": model, "messages": user, "temperature": 5},
        "stream_options_string": {"model": model, "messages": user, "stream": True, "stream_options": "yes"},
        "unknown_data_class": {"model": model, "messages": user, "max_tokens": 4},
    }
    raw = {"not_json": b"{this is not json", "truncated_json": b'{"model": "' + model.encode() + b'", "messages": [{"ro',
           "json_array": b"[1, 2, 3]", "empty": b"", "binary": bytes(range(128, 256))}
    content = raw[variant] if variant in raw else json.dumps(bodies[variant]).encode()
    return variant, content, "top-secret" if variant == "unknown_data_class" else None


def _event_kind(data: str) -> str:
    """One SSE payload: ``done`` ([DONE]), ``error`` (an error object), ``bad`` (not JSON) or ``chunk``."""
    if data.strip() == "[DONE]":
        return "done"
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return "bad"
    return "error" if isinstance(event, dict) and "error" in event else "chunk"


def _flag_served(result: Result) -> Result:
    """A malformed or over-long request that got a 200 is a bug of its own; label it so."""
    if result.outcome != "200":
        return result
    return Result(result.kind, result.variant, result.restricted, result.start, result.end, UNEXPECTED_200,
                  result.reached, "served although it should have been refused")


async def run_clients(traffic: Traffic, clients: int, duration_s: float, weights: dict[str, float],
                      seed: int) -> list[Result]:
    """``clients`` loops, each sending one request after another until ``duration_s`` has passed."""
    kinds = sorted(weights)
    deadline = traffic.t0 + duration_s
    results: list[Result] = []

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
            results.append(await traffic.one(kind, rng))
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # NOTE: a little think time, so clients drift apart

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results
