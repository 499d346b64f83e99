"""Fixtures for the tool-calling tests: an engine that answers with a scripted text (so the route's
tool parsing is tested on exact model outputs), and the real server's factory."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
from ferry_server import ServerProcess

from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ferry.sampling_params import SamplingParams

# a small hermes template in Qwen2.5's shape: tools in the system turn, calls as <tool_call> blocks
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{%- if message.content %}
{{ message.content }}{% endif %}
{%- for tool_call in message.tool_calls %}{% set tool_call = tool_call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


class ScriptTokenizer:
    """Byte tokens (id = byte + 3, 2 = <eos>); the chat template is rendered with jinja2 so the
    tests can see what reached it."""

    vocab_size = 259
    eos_token_ids = (2,)

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.rendered: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, **_: json.dumps(x)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{"tools": None, **kwargs})
        self.rendered.append(text)
        return text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


@dataclass
class ScriptedEngine:
    """Every choice answers ``script`` (cut at ``max_tokens``), one byte-token per step."""

    script: str = ""
    template: str = HERMES_TEMPLATE
    is_running = True
    dead_reason: str | None = None
    max_model_len: int = 4096
    model_name: str = "scripted"
    tokenizer: ScriptTokenizer = field(init=False)
    params: list[SamplingParams] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokenizer = ScriptTokenizer(self.template)

    async def generate(self, prompt: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self.params.append(params)
        ids = self.tokenizer.encode(self.script)
        limit = params.max_tokens or len(ids)
        metrics = RequestMetrics(arrival_time=time.monotonic(), first_scheduled_time=time.monotonic())
        for step in range(1, min(len(ids), limit) + 1):
            done = step == len(ids) or step == limit
            reason = None if not done else ("stop" if step == len(ids) else "length")
            text = self.tokenizer.decode(ids[:step])
            yield RequestOutput(request_id, None, list(prompt), [
                CompletionOutput(i, text, ids[:step], reason, None, None) for i in range(params.n)],
                done, num_cached_tokens=0, metrics=metrics)

    async def abort(self, request_id: str) -> None:
        return None

    def start(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def stats(self) -> Any:
        return SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=64,
                               num_total_blocks=64, num_preemptions_total=0,
                               prefix_cache_queries_total=0, prefix_cache_hits_total=0)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(model: str | Path, *extra: str) -> ServerProcess:
        server = ServerProcess(model, tmp_path_factory.mktemp("server") / "server.log", *extra)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def make_engine() -> type[ScriptedEngine]:
    return ScriptedEngine


@pytest.fixture(scope="session")
def hermes_template() -> str:
    return HERMES_TEMPLATE


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "grammar: needs the engine to apply structured_outputs "
                                       "(constrained decoding)")
