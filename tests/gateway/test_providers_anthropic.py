"""The anthropic backend kind: OpenAI chat requests through the gateway to a Messages API upstream.

The fake provider is first checked with Anthropic's own SDK (so it speaks the documented API, the
streaming event sequence included); then the gateway's translation is checked on the wire and in
what the official OpenAI client reads: text, system prompts, stop reasons, usage (prompt-cache reads
counted), streaming chunks, tool calls both ways, error shapes, and failover on 529.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from gateway.conftest import backend
from gateway.fake_providers import ANTHROPIC_KEY, ProviderState, start_provider
from gateway.upstream import ServerThread

ENV = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture
def provider() -> Iterator[tuple[ProviderState, ServerThread]]:
    state, server = start_provider("anthropic")
    yield state, server
    server.stop()


def claude(server: ServerThread, **kw: Any) -> dict[str, Any]:
    return backend("claude", server, "cloud", kind="anthropic", api_key_env="ANTHROPIC_API_KEY", **kw)


def test_the_fake_speaks_the_messages_api_as_the_sdk_reads_it(provider) -> None:
    _, server = provider
    client = anthropic.Anthropic(base_url=server.url, api_key=ANTHROPIC_KEY, max_retries=0)
    msg = client.messages.create(model="claude-fake", max_tokens=20, system="be brief",
                                 messages=[{"role": "user", "content": "hello"}])
    assert msg.stop_reason == "end_turn" and msg.content[0].type == "text"
    with client.messages.stream(model="claude-fake", max_tokens=20,
                                messages=[{"role": "user", "content": "hello"}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text.strip() == msg.content[0].text.strip()
    assert streamed.usage.output_tokens == msg.usage.output_tokens
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="claude-fake", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_chat_is_translated_to_messages_and_back(provider, gateway) -> None:
    state, server = provider
    gw = gateway([claude(server)], env=ENV)
    client = gw.openai(gw.create_key(name="alice"))
    r = client.chat.completions.create(model="chat", max_tokens=20, temperature=0.2, stop=["zulu"], messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "and now?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}])
    sent = state.bodies[-1]
    assert state.paths[-1] == "/v1/messages"
    assert state.headers[-1]["x-api-key"] == ANTHROPIC_KEY and state.headers[-1]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in state.headers[-1]
    assert sent["model"] == "claude-model" and sent["system"] == "You are terse."
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.2 and sent["stop_sequences"] == ["zulu"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][2]["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}}
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    # prompt tokens count the prompt cache's reads (2) as Anthropic bills them
    assert r.usage.prompt_tokens > 2 and r.usage.completion_tokens == len(r.choices[0].message.content.split())
    short = client.chat.completions.create(model="chat", max_tokens=3, messages=[{"role": "user", "content": "x"}])
    assert short.choices[0].finish_reason == "length"
    rows = gw.ledger()
    assert rows[-1]["backend"] == "claude" and rows[-1]["status"] == 200
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (r.usage.prompt_tokens,
                                                                        r.usage.completion_tokens)
    assert rows[0]["cost_usd"] > 0


def test_streams_become_openai_chunks_with_usage(provider, gateway) -> None:
    _, server = provider
    gw = gateway([claude(server)], env=ENV)
    client = gw.openai(gw.create_key(name="alice"))
    whole = client.chat.completions.create(model="chat", max_tokens=20,
                                           messages=[{"role": "user", "content": "stream me"}])
    chunks = list(client.chat.completions.create(model="chat", max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "stream me"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == whole.choices[0].message.content.split()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    rows = gw.ledger()
    assert rows[-1]["stream"] and rows[-1]["completion_tokens"] == whole.usage.completion_tokens


def test_tool_calls_both_ways(provider, gateway) -> None:
    state, server = provider
    gw = gateway([claude(server)], env=ENV)
    client = gw.openai(gw.create_key(name="alice"))
    ask = [{"role": "user", "content": "what is the weather in Paris?"}]
    r = client.chat.completions.create(model="chat", max_tokens=50, messages=ask, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False)
    sent = state.bodies[-1]
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.id == "toolu_01" and call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'
    # streamed: the arguments arrive in pieces and join to the same JSON
    chunks = list(client.chat.completions.create(model="chat", max_tokens=50, messages=ask, tools=TOOLS,
                                                 stream=True))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert pieces[0].id == "toolu_01" and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the tool's answer goes back as a tool_result block of a user turn
    follow = ask + [r.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": "toolu_01", "content": "18 C, sunny"}]
    client.chat.completions.create(model="chat", max_tokens=20, messages=follow, tools=TOOLS)
    turns = state.bodies[-1]["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"][-1] == {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                       "input": {"city": "Paris"}}
    assert turns[2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C, sunny"}]


def test_errors_keep_openai_shapes(provider, gateway) -> None:
    state, server = provider
    gw = gateway([claude(server)], env=ENV)
    client = gw.openai(gw.create_key(name="alice"))
    msg = [{"role": "user", "content": "hi"}]
    # what Messages cannot express is a 400 naming the parameter, and nothing reaches the provider
    sent = len(state.bodies)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat", messages=msg, n=2)
    assert "n:" in e.value.message and len(state.bodies) == sent
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="chat", messages=msg, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="completions"):
        client.completions.create(model="chat", prompt="hi", max_tokens=3)
    # a wrong key at the provider: its 401, in OpenAI's shape, with Anthropic's error type
    bad = gateway([claude(server)], env={"ANTHROPIC_API_KEY": "sk-ant-wrong"})
    with pytest.raises(openai.AuthenticationError) as e:
        bad.openai(bad.create_key(name="bob")).chat.completions.create(model="chat", messages=msg)
    assert e.value.body["type"] == "authentication_error" and "x-api-key" in e.value.body["message"]


def test_overloaded_fails_over_to_the_next_backend(provider, gateway, upstreams) -> None:
    state, server = provider
    _, other = upstreams("spare")
    gw = gateway([claude(server), backend("spare", other, "cloud")], env=ENV,
                 routing={"policy": "lowest-cost", "retries": 1})
    state.overloaded = 1
    client = gw.openai(gw.create_key(name="alice"))
    r = client.chat.completions.with_raw_response.create(model="chat", max_tokens=5,
                                                        messages=[{"role": "user", "content": "hi"}])
    assert r.headers["x-ferry-backend"] == "spare"
    row = gw.ledger()[-1]
    assert row["attempts"] == 2 and "claude" in row["reason"] and "HTTP 503" in row["reason"]


def test_health_checks_the_model_list_with_the_key(provider, gateway) -> None:
    _, server = provider
    gw = gateway([claude(server)], env=ENV)
    gw.wait_for(lambda: gw.admin.get("/health").json()["backends"]["claude"]["up"], what="claude up")
    bad = gateway([claude(server)], env={"ANTHROPIC_API_KEY": "sk-ant-wrong"})
    # NOTE: a 401 means the backend answers; health is about reachability, the key shows per request
    bad.wait_for(lambda: bad.admin.get("/health").json()["backends"]["claude"]["up"], what="claude up")
