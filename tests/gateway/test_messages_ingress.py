"""``POST /v1/messages``: Anthropic's SDK talks to the gateway, which routes like chat completions.

Text, system prompts, stop reasons, usage and the ledger through an OpenAI-compatible on-prem
upstream; the stream as the SDK assembles it; tool use round-tripped through an anthropic backend;
and every error in Anthropic's shape with the status the chat endpoint would give.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest
from gateway.conftest import backend
from gateway.fake_providers import ANTHROPIC_KEY, start_provider
from gateway.upstream import ServerThread

TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def sdk(gw, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def claude_upstream() -> Iterator[ServerThread]:
    _, server = start_provider("anthropic")
    yield server
    server.stop()


def test_messages_reach_an_openai_upstream_and_come_back(upstreams, gateway) -> None:
    state, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    key = gw.create_key(name="alice")
    client = sdk(gw, key)
    raw = client.messages.with_raw_response.create(
        model="chat", max_tokens=6, system="You are terse.", extra_body={"temperature": 0.5},
        messages=[{"role": "user", "content": "tell me about ferries"}])
    msg = raw.parse()
    assert raw.headers["x-ferry-backend"] == "rack" and raw.headers["x-ferry-location"] == "onprem"
    sent = state.bodies[-1]
    assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "tell me about ferries"}]
    assert sent["max_tokens"] == 6 and sent["temperature"] == 0.5 and sent["model"] == "rack-model"
    # the same question on the chat endpoint gets the same words
    chat = gw.openai(key).chat.completions.create(
        model="chat", max_tokens=6, messages=sent["messages"])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "chat"
    assert msg.content[0].type == "text" and msg.content[0].text == chat.choices[0].message.content
    assert msg.stop_reason == "max_tokens"  # the upstream said "length"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    rows = gw.ledger()
    assert len(rows) == 2 and rows[0]["key_name"] == "alice" and rows[0]["completion_tokens"] == 6


def test_the_stream_is_the_messages_event_sequence(upstreams, gateway) -> None:
    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    client = sdk(gw, gw.create_key(name="alice"))
    ask = [{"role": "user", "content": "stream about ferries"}]
    whole = client.messages.create(model="chat", max_tokens=5, messages=ask)
    with client.messages.stream(model="chat", max_tokens=5, messages=ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert final.usage.input_tokens == whole.usage.input_tokens
    row = gw.ledger()[-1]
    assert row["stream"] and row["status"] == 200 and row["completion_tokens"] == 5


def test_tool_use_round_trips_through_an_anthropic_backend(claude_upstream, gateway) -> None:
    gw = gateway([backend("claude", claude_upstream, "cloud", kind="anthropic", api_key_env="ANTHROPIC_API_KEY")],
                 env={"ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    client = sdk(gw, gw.create_key(name="alice"))
    ask = [{"role": "user", "content": "what is the weather in Paris?"}]
    msg = client.messages.create(model="chat", max_tokens=50, messages=ask, tools=TOOLS,
                                 tool_choice={"type": "any"})
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert (use.id, use.name, use.input) == ("toolu_01", "get_weather", {"city": "Paris"})
    with client.messages.stream(model="chat", max_tokens=50, messages=ask, tools=TOOLS) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.input == {"city": "Paris"} and final.stop_reason == "tool_use"
    # the tool's result goes back and the conversation goes on
    follow = ask + [{"role": "assistant", "content": [b.model_dump() for b in msg.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                                  "content": "18 C, sunny"}]}]
    again = client.messages.create(model="chat", max_tokens=20, messages=follow, tools=TOOLS)
    assert again.stop_reason in ("end_turn", "max_tokens") and again.content[0].type == "text"


def test_errors_are_in_anthropics_shape(upstreams, gateway) -> None:
    _, srv = upstreams("rack")
    gw = gateway([backend("rack", srv, "onprem")])
    key = gw.create_key(name="alice", models=["chat"])
    client = sdk(gw, key)
    with pytest.raises(anthropic.AuthenticationError) as e:
        sdk(gw, "sk-wrong").messages.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": key},
                   json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": key}, content=b"{not json",
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        client.messages.create(model="chat", max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               thinking={"type": "enabled", "budget_tokens": 1024})
    # restricted data that only the cloud could serve: 503, nothing leaves
    cloud_only = gateway([backend("cloud", srv, "cloud")])
    with pytest.raises(anthropic.InternalServerError) as e:
        sdk(cloud_only, cloud_only.create_key(name="bob", data_class="restricted")).messages.create(
            model="chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and e.value.body["error"]["type"] == "api_error"
