"""Tool calling with the official ``openai`` SDK against a real ``ferry serve`` over SmolLM2 (given a
hermes chat template, as Qwen2.5's): forced calls validate against the function's schema, the
tool result goes back and the model answers, streaming reassembles to the blocking answer.

The tests marked ``grammar`` need the engine to apply ``structured_outputs`` (constrained
decoding); without it a 135M model rarely writes valid JSON by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["tz"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                      "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server_factory: Any, smollm2_path: Path, hermes_template: str,
           tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(hermes_template)
    server = server_factory(smollm2_path, "--max-model-len", "1024", "--kv-cache-memory", "128MiB",
                            "--served-model-name", "smol", "--chat-template", str(template),
                            "--enable-auto-tool-choice")
    server.wait_ready()
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=300)


def _create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="smol", temperature=0, max_tokens=48, **kwargs)


@pytest.mark.grammar
def test_named_call_round_trip(client: openai.OpenAI) -> None:
    r = _create(client, messages=ASK, tools=TOOLS, tool_choice=NAMED)
    message = r.choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    answer = _create(client, messages=history, tools=TOOLS, tool_choice="none")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.grammar
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate(client: openai.OpenAI, parallel: bool) -> None:
    for question in ("What is the weather in Paris?", "What time is it in Berlin?"):
        r = _create(client, messages=[{"role": "user", "content": question}], tools=TOOLS,
                    tool_choice="required", parallel_tool_calls=parallel)
        calls = r.choices[0].message.tool_calls
        assert calls and r.choices[0].finish_reason == "tool_calls"
        assert parallel or len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_streamed_named_call_reassembles_to_the_blocking_one(client: openai.OpenAI) -> None:
    blocking = _create(client, messages=ASK, tools=TOOLS, tool_choice=NAMED)
    [want] = blocking.choices[0].message.tool_calls
    name, arguments, ids, finish = None, "", [], None
    for chunk in _create(client, messages=ASK, tools=TOOLS, tool_choice=NAMED, stream=True):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.append(tc.id)
                    name = tc.function.name
                arguments += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and name == "get_weather"
    assert arguments == want.function.arguments
    assert finish == blocking.choices[0].finish_reason


def test_unknown_request_fields_are_ignored(client: openai.OpenAI) -> None:
    r = _create(client, messages=ASK, max_completion_tokens=4,
                extra_body={"use_beam_search": False, "some_future_field": {"a": 1},
                            "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content
