"""Tools, assistant tool_calls and tool results render through ferry's chat templates exactly as
``transformers`` renders them (the reference), with OpenAI's JSON-text arguments turned into the
dict these templates `tojson`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ferry.server.protocol import ChatCompletionRequest
from ferry.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

# Llama 3.1's tool format, cut down: tools in the system turn, one JSON call per assistant turn,
# results in an ipython turn.
LLAMA31_TEMPLATE = """\
{{- bos_token }}{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}<|eot_id|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- if message.tool_calls | length != 1 %}{{ raise_exception("This model only supports single tool-calls at once!") }}{% endif %}
{%- set tool_call = message.tool_calls[0].function %}<|start_header_id|>assistant<|end_header_id|>

{{ '{"name": "' + tool_call.name + '", "parameters": ' }}{{ tool_call.arguments | tojson }}{{ "}" }}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{% if message.content is mapping or message.content is iterable %}{{ message.content | tojson }}{% else %}{{ message.content }}{% endif %}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ARGS = {"city": "Paris", "note": "naïve \"quoted\""}


def _history(arguments: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]


@pytest.mark.parametrize("which", ["hermes", "llama31"])
def test_ferry_renders_tools_like_transformers(which: str, hf_tokenizer_dir: Path,
                                               hermes_template: str) -> None:
    from transformers import AutoTokenizer

    template = hermes_template if which == "hermes" else LLAMA31_TEMPLATE
    ferry_tok = Tokenizer.from_hf_folder(hf_tokenizer_dir)
    ferry_tok.replace_chat_template(template)
    req = ChatCompletionRequest.model_validate({"messages": _history(json.dumps(ARGS)),
                                                "tools": TOOLS})
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    got = ferry_tok.apply_chat_template(req.template_messages(), tools=tools)

    hf = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    # transformers passes arguments as given: templates that `tojson` them want the dict
    reference = _history(ARGS)
    reference[2]["content"] = ""
    want = hf.apply_chat_template(reference, tools=TOOLS, chat_template=template, tokenize=False,
                                  add_generation_prompt=True)
    assert got == want
    assert json.dumps(ARGS, ensure_ascii=False) in got  # printed once, not as a quoted string
    assert '"name": "get_weather"' in got and "21 C" in got
