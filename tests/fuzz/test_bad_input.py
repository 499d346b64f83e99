"""The inputs that cost `ferry serve` a 500 and a dropped connection (or were coerced into a 200),
on `ferry serve` and on `ferry gateway`: each is an OpenAI-shaped 400, and the same keep-alive
connection then serves a good request."""

from __future__ import annotations

import pytest
from ferry_server import ServerProcess
from fuzz.bad_inputs import (
    CHAT,
    COMPLETIONS,
    BadInput,
    assert_400_then_served,
    bad_inputs,
    raw,
    stop_token_id_inputs,
)
from fuzz.conftest import AUTH, SERVE_MODEL, TINY_VOCAB
from gateway.conftest import GatewayHarness
from gateway.upstream import ServerThread, UpstreamState

SERVE_CASES = bad_inputs(SERVE_MODEL, tokenize=True) + stop_token_id_inputs(SERVE_MODEL, TINY_VOCAB)
GATEWAY_CASES = bad_inputs("chat", tokenize=False)
SERVE_GOOD = raw({"model": SERVE_MODEL, "prompt": "hello", "max_tokens": 2})
GATEWAY_GOOD = raw({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})


@pytest.mark.parametrize("case", SERVE_CASES, ids=lambda c: c.name)
def test_serve_answers_400_and_keeps_the_connection(tiny_serve: ServerProcess, case: BadInput) -> None:
    assert_400_then_served(tiny_serve.port, case, COMPLETIONS, SERVE_GOOD)


@pytest.mark.parametrize("case", GATEWAY_CASES, ids=lambda c: c.name)
def test_gateway_answers_400_and_keeps_the_connection(
        gateway_over_fake: GatewayHarness, fake_upstream: tuple[UpstreamState, ServerThread],
        case: BadInput) -> None:
    assert_400_then_served(gateway_over_fake.server.port, case, CHAT, GATEWAY_GOOD, AUTH)
    state = fake_upstream[0]
    assert state.requests == 1, "only the good request may reach the upstream"
    assert [r["status"] for r in gateway_over_fake.ledger()] == [400, 200]  # refusals are rows too


@pytest.mark.parametrize("case", stop_token_id_inputs("chat", TINY_VOCAB), ids=lambda c: c.name)
def test_gateway_passes_on_the_servers_400(gateway_over_serve: GatewayHarness, case: BadInput) -> None:
    """Only the replica knows its vocabulary: its 400 reaches the client through the gateway."""
    good = raw({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    error = assert_400_then_served(gateway_over_serve.server.port, case, CHAT, good, AUTH)
    assert "vocabulary" in error["message"]
