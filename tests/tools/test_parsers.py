"""Tool-call parsers on recorded model outputs: whole, char by char and in token-ish chunks the
answers agree; malformed calls come back as plain content; no partial markup leaks as content."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from ferry.server.tool_parsers import parser_factory, parser_for_template
from ferry.server.tool_parsers.base import Content, Event, assemble, run_all
from ferry.server.tool_parsers.forced import NamedCall, RequiredCalls, required_schema

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
# (parser, model output, expected content, expected [(name, arguments dict)])
CASES = [
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>", None,
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("hermes", (f"Let me look that up.\n\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
                '{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'),
     "Let me look that up.", [("get_weather", {"city": "Paris", "unit": "celsius"}),
                              ("get_time", {"tz": "CET"})]),
    ("hermes", "The weather is sunny, 21 °C.", "The weather is sunny, 21 °C.", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None,
     [("f", {"x": 1})]),
    # malformed: unclosed tag, bad JSON, no name -> plain content, markup included
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", 'a <tool_call>{"arguments": {}}</tool_call> b',
     'a <tool_call>{"arguments": {}}</tool_call> b', []),
    ("hermes", "ends with <tool_ca", "ends with <tool_ca", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", '
                     '"parameters": {}}'), None, [("a", {"x": 1}), ("b", {})]),
    ("llama3_json", "Paris is sunny today.", "Paris is sunny today.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '{"name": "a", "parameters": {"x": ', '{"name": "a", "parameters": {"x": ', []),
    ("mistral", ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "get_time", "arguments": {}}]'), None,
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure.",
     [("get_weather", {"city": "Paris"})]),
    ("mistral", "[TOOL_CALLS][{bad}]", "[TOOL_CALLS][{bad}]", []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x"', '[TOOL_CALLS][{"name": "a", "arguments": {"x"', []),
]


def _pieces(text: str, how: str) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    rng = random.Random(len(text))  # token-ish: 1..6 characters
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i:i + n])
        i += n
    return out


def _stream(name: str, text: str, how: str) -> list[Event]:
    parser = parser_factory(name)()
    events: list[Event] = []
    for piece in _pieces(text, how):
        events += parser.feed(piece)
    return events + parser.finish()


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("how", ["whole", "chars", "chunks"])
def test_recorded_outputs(name: str, text: str, content: str | None, calls: list, how: str) -> None:
    got = assemble(_stream(name, text, how))
    assert got.content == content
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == calls
    assert len({c.id for c in got.tool_calls}) == len(calls)


@pytest.mark.parametrize(("name", "text"), [(c[0], c[1]) for c in CASES])
def test_stream_reassembles_to_the_whole_answer(name: str, text: str) -> None:
    whole = run_all(parser_factory(name)(), text)
    for how in ("chars", "chunks"):
        got = assemble(_stream(name, text, how))
        assert got.content == whole.content
        assert [(c.name, c.arguments) for c in got.tool_calls] == \
            [(c.name, c.arguments) for c in whole.tool_calls]


def test_no_partial_markup_leaks_as_content() -> None:
    text = f"Checking.<tool_call>{WEATHER}</tool_call>"
    events = _stream("hermes", text, "chars")
    content = [e.text for e in events if isinstance(e, Content)]
    assert "".join(content) == "Checking." and not any("<" in c for c in content)
    events = _stream("mistral", 'ok [TOOL_CALLS][{"name": "a", "arguments": {}}]', "chars")
    assert "".join(e.text for e in events if isinstance(e, Content)) == "ok"


def test_first_call_delta_has_id_and_name_then_arguments() -> None:
    events = _stream("hermes", f"<tool_call>{WEATHER}</tool_call>", "chars")
    assert events[0].id.startswith("chatcmpl-tool-") and events[0].name == "get_weather"  # type: ignore[union-attr]
    assert events[0].arguments == ""
    mistral = _stream("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}]', "whole")
    assert len(mistral[0].id) == 9 and mistral[0].id.isalnum()  # type: ignore[union-attr, arg-type]


def test_named_call_streams_arguments_as_generated() -> None:
    parser = NamedCall("get_weather")
    events = [*parser.feed('{"city"'), *parser.feed(': "Paris"}'), *parser.finish()]
    assert [e.arguments for e in events] == ["", '{"city"', ': "Paris"}']  # type: ignore[union-attr]
    got = assemble(events)
    assert got.content is None and got.tool_calls[0].name == "get_weather"
    assert json.loads(got.tool_calls[0].arguments) == {"city": "Paris"}


@pytest.mark.parametrize("how", ["whole", "chars", "chunks"])
def test_required_array(how: str) -> None:
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"name": "get_time", "parameters": {}}]')
    parser = RequiredCalls(["get_weather", "get_time"])
    events: list[Event] = []
    for piece in _pieces(text, how):
        events += parser.feed(piece)
    got = assemble([*events, *parser.finish()])
    assert got.content is None
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_required_output_that_is_not_calls_is_content() -> None:
    assert run_all(RequiredCalls(["f"]), "I cannot.").content == "I cannot."
    assert run_all(RequiredCalls(["f"]), '[{"name": "g", "parameters": {}}]').tool_calls == []
    cut = run_all(RequiredCalls(["f"]), '[{"name": "f", "parameters": {}}, {"name": "f", "par')
    assert len(cut.tool_calls) == 1 and cut.content == '{"name": "f", "par'


def test_required_schema_accepts_calls_and_refuses_others() -> None:
    weather = {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
        "$defs": {"City": {"type": "string", "enum": ["Paris", "Oslo"]}}}}
    clock = {"name": "get_time"}
    schema = required_schema([weather, clock], parallel=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": "Rome"}}],
                [{"name": "nope", "parameters": {}}], [{"name": "get_weather"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_schema([weather, clock], parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok, single)
    jsonschema.validate(ok[:1], single)


def test_parser_from_template() -> None:
    assert parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert parser_for_template("[TOOL_CALLS] {{ x }}") == "mistral"
    assert parser_for_template("{{ '<|python_tag|>' }} tool") == "llama3_json"
    assert parser_for_template("{{ messages }}") is None
    with pytest.raises(ValueError, match="unknown tool call parser"):
        parser_factory("nope")
