"""The chat route's tool calling on scripted model outputs (in-process app, exact answers)."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import httpx
import pytest

from ferry.config import ServerConfig
from ferry.server import build_app
from ferry.sse import parse_sse


class ScriptedEngine(Protocol):  # tests/tools/conftest.py's, made by the make_engine fixture
    tokenizer: Any
    params: list[Any]


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _client(engine: ScriptedEngine, **config: Any) -> httpx.AsyncClient:
    app = build_app(engine, ServerConfig(**config), max_num_seqs=4)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _post(engine: ScriptedEngine, body: dict[str, Any], **config: Any) -> httpx.Response:
    async with _client(engine, **config) as c:
        return await c.post("/v1/chat/completions", json={"messages": ASK, **body})


def _reassemble(text: str) -> tuple[str | None, list[dict[str, Any]], str | None]:
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for event in parse_sse(text):
        if event == "[DONE]":
            break
        for choice in json.loads(event)["choices"]:
            delta = choice["delta"]
            content.append(delta.get("content") or "")
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if tc.get("id"):
                    assert call["id"] is None and tc["function"]["name"]  # id and name come first
                    call["id"], call["name"] = tc["id"], tc["function"]["name"]
                assert call["id"] is not None
                call["arguments"] += tc["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


async def test_auto_hermes_call_blocking_and_streaming(make_engine: Any) -> None:
    engine = make_engine(CALL)
    r = await _post(engine, {"tools": TOOLS}, enable_auto_tool_choice=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the tools reached the template (the parser was taken from it: no --tool-call-parser)
    assert '"name": "get_weather"' in engine.tokenizer.rendered[-1]

    r = await _post(engine, {"tools": TOOLS, "stream": True}, enable_auto_tool_choice=True)
    content, calls, finish = _reassemble(r.text)
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert "<tool_call" not in r.text.split('"tool_calls"')[0]  # no markup leaked as content


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_call_is_plain_content(make_engine: Any, stream: bool) -> None:
    bad = 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": '
    r = await _post(make_engine(bad), {"tools": TOOLS, "stream": stream},
                    enable_auto_tool_choice=True)
    assert r.status_code == 200
    if stream:
        content, calls, finish = _reassemble(r.text)
    else:
        msg = r.json()["choices"][0]["message"]
        content, calls, finish = msg["content"], msg.get("tool_calls") or [], \
            r.json()["choices"][0]["finish_reason"]
    assert (content, calls, finish) == (bad, [], "stop")


async def test_auto_needs_the_flag_as_in_vllm(make_engine: Any) -> None:
    r = await _post(make_engine(CALL), {"tools": TOOLS})
    assert r.status_code == 400
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


async def test_tool_choice_none_answers_text_with_tools_in_the_template(make_engine: Any) -> None:
    engine = make_engine(CALL)
    r = await _post(engine, {"tools": TOOLS, "tool_choice": "none"})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": CALL}
    assert "<tools>" in engine.tokenizer.rendered[-1]
    await _post(engine, {"tools": TOOLS, "tool_choice": "none"},
                exclude_tools_when_tool_choice_none=True)
    assert "<tools>" not in engine.tokenizer.rendered[-1]


@pytest.mark.parametrize("stream", [False, True])
async def test_named_choice_sets_the_grammar_and_returns_one_call(make_engine: Any, stream: bool) -> None:
    engine = make_engine('{"city": "Oslo"}')
    r = await _post(engine, {"tools": TOOLS, "stream": stream, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert r.status_code == 200, r.text
    assert engine.params[-1].structured_outputs.json == TOOLS[0]["function"]["parameters"]
    if stream:
        content, calls, finish = _reassemble(r.text)
    else:
        choice = r.json()["choices"][0]
        content, calls, finish = choice["message"]["content"], [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in choice["message"]["tool_calls"]], choice["finish_reason"]
    assert content is None and finish == "stop"  # a forced call ends with "stop", as OpenAI's
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]


async def test_required_sets_an_array_grammar_and_parses_the_calls(make_engine: Any) -> None:
    engine = make_engine('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    r = await _post(engine, {"tools": TOOLS, "tool_choice": "required",
                             "parallel_tool_calls": False})
    schema = engine.params[-1].structured_outputs.json
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
async def test_bad_tool_requests_are_400s(make_engine: Any, body: dict[str, Any], param: str) -> None:
    r = await _post(make_engine("x"), body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_history_with_calls_and_results_renders(make_engine: Any) -> None:
    engine = make_engine("It is 21 °C in Paris.")
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    async with _client(engine, enable_auto_tool_choice=True) as c:
        r = await c.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS})
    assert r.json()["choices"][0]["message"]["content"] == "It is 21 °C in Paris."
    rendered = engine.tokenizer.rendered[-1]
    # arguments reach the template as a dict, so `tojson` prints them once, not as a quoted string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\n21 C\n</tool_response>" in rendered


async def test_chat_template_kwargs_reach_the_template(make_engine: Any) -> None:
    engine = make_engine("ok", template="{{ 'think' if enable_thinking else 'plain' }}|"
                                           "{{ messages[-1].content }}")
    await _post(engine, {"chat_template_kwargs": {"enable_thinking": True}})
    assert engine.tokenizer.rendered[-1] == "think|Weather in Paris?"
    await _post(engine, {})
    assert engine.tokenizer.rendered[-1] == "plain|Weather in Paris?"


async def test_unknown_fields_are_ignored_with_a_warning(make_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    body = {"frobnicate": 1, "use_beam_search": False, "chat_template": "x", "top_k": 5}
    with caplog.at_level(logging.WARNING, logger="ferry.server.protocol"):
        r = await _post(make_engine("ok"), body)
    assert r.status_code == 200, r.text
    assert "frobnicate" in caplog.text and "use_beam_search" in caplog.text
    r = await _post(make_engine("ok"), body, strict_params=True)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "frobnicate"
