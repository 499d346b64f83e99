"""An Anthropic Messages answer in OpenAI's shapes: a chat completion, or chat completion chunks.

Stop reasons map as OpenAI's clients expect (``end_turn``/``stop_sequence`` -> ``stop``,
``max_tokens`` -> ``length``, ``tool_use`` -> ``tool_calls``, ``refusal`` -> ``content_filter``);
prompt tokens include the prompt cache's reads and writes, which Anthropic counts apart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ferry.gateway.anthropic.errors import openai_error_from_anthropic

FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}


def prompt_tokens(usage: dict[str, Any]) -> int:
    return sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens",
                                                 "cache_read_input_tokens"))


def openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(message: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """A whole Messages response as a chat completion."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            reasoning.append(block.get("thinking", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": json.dumps(block.get("input") or {})}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    usage = message.get("usage") or {}
    return {"id": message.get("id"), "object": "chat.completion", "created": created or int(time.time()),
            "model": message.get("model"),
            "choices": [{"index": 0, "message": reply, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(message.get("stop_reason") or "", "stop")}],
            "usage": openai_usage(prompt_tokens(usage), int(usage.get("output_tokens") or 0))}


@dataclass
class ChunkTranslator:
    """Anthropic stream events in, OpenAI chunks out (``feed`` returns the chunks one event makes).

    The chunk after ``message_stop`` carries the usage (``choices: []``), as OpenAI's
    ``stream_options.include_usage`` does; ``done`` then says the stream is complete.
    """

    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    model: str = ""
    prompt: int = 0
    completion: int = 0
    finish_reason: str | None = None
    done: bool = False
    _tools: dict[int, int] = field(default_factory=dict)  # content block index -> tool call index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id, self.model = str(message.get("id") or ""), str(message.get("model") or "")
            usage = message.get("usage") or {}
            self.prompt = prompt_tokens(usage)
            self.completion = int(usage.get("output_tokens") or 0)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                n = self._tools[int(event.get("index", 0))] = len(self._tools)
                return [self._chunk({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if dkind == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            if dkind == "input_json_delta":
                n = self._tools.get(int(event.get("index", 0)))
                if n is None:
                    return []
                return [self._chunk({"tool_calls": [{"index": n, "function": {
                    "arguments": delta.get("partial_json", "")}}]})]
            return []  # signatures, citations: nothing an OpenAI client reads
        if kind == "message_delta":
            usage = event.get("usage") or {}
            self.completion = int(usage.get("output_tokens") or self.completion)
            if any(usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")):
                self.prompt = max(self.prompt, prompt_tokens(usage))
            reason = (event.get("delta") or {}).get("stop_reason")
            self.finish_reason = FINISH_REASONS.get(reason or "", "stop")
            return [self._chunk({}, self.finish_reason)]
        if kind == "message_stop":
            self.done = True
            return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [],
                     "usage": openai_usage(self.prompt, self.completion)}]
        if kind == "error":
            return [openai_error_from_anthropic(500, event)]
        return []  # ping, content_block_stop
