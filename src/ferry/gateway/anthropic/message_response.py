"""An OpenAI chat answer in Anthropic's shapes: a Message, or the Messages stream's events.

Finish reasons map back (``stop`` -> ``end_turn``, or ``stop_sequence`` when the upstream names the
stop string it matched, as ferry serve and vLLM do in ``stop_reason``; ``length`` -> ``max_tokens``;
``tool_calls`` -> ``tool_use``; ``content_filter`` -> ``refusal``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from ferry.gateway.anthropic.errors import anthropic_error_type

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}


def _stop(choice: dict[str, Any], stop_sequences: list[str]) -> tuple[str, str | None]:
    reason = STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn")
    matched = choice.get("stop_reason")
    if reason == "end_turn" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return reason, None


def _arguments(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {"_raw": raw}  # NOTE: a model's malformed arguments reach the client, not a 500
    return value if isinstance(value, dict) else {"_value": value}


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def anthropic_message(completion: dict[str, Any], model: str, stop_sequences: list[str]) -> dict[str, Any]:
    choice = (completion.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reply.get("content"):
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{len(content)}",
                        "name": fn.get("name"), "input": _arguments(fn.get("arguments"))})
    reason, sequence = _stop(choice, stop_sequences)
    usage = completion.get("usage") or {}
    return {"id": message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                      "output_tokens": int(usage.get("completion_tokens") or 0)}}


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


@dataclass
class EventTranslator:
    """OpenAI chunks in, Messages stream events out (``feed``; ``finish`` at ``[DONE]``)."""

    model: str
    stop_sequences: list[str]
    id: str = field(default_factory=message_id)
    started: bool = False
    block: int = -1  # the open content block's index, -1 none
    block_kind: str | None = None
    tool_blocks: dict[int, int] = field(default_factory=dict)  # OpenAI tool call index -> block index
    stop_reason: str | None = None
    stop_sequence: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        return [{"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}]

    def _close_block(self) -> list[dict[str, Any]]:
        if self.block_kind is None:
            return []
        self.block_kind = None
        return [{"type": "content_block_stop", "index": self.block}]

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close_block()
        self.block += 1
        self.block_kind = block["type"]
        return events + [{"type": "content_block_start", "index": self.block, "content_block": block}]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in chunk and not chunk.get("choices"):
            error = chunk.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            return [{"type": "error", "error": {"type": anthropic_error_type(500), "message": str(message)}}]
        events = self._start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = int(usage.get("prompt_tokens") or self.input_tokens)
            self.output_tokens = int(usage.get("completion_tokens") or self.output_tokens)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.block_kind != "text":
                    events += self._open({"type": "text", "text": ""})
                events.append({"type": "content_block_delta", "index": self.block,
                               "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or ():
                n = int(call.get("index") or 0)
                fn = call.get("function") or {}
                if n not in self.tool_blocks:
                    events += self._open({"type": "tool_use", "id": call.get("id") or f"toolu_{n}",
                                          "name": fn.get("name"), "input": {}})
                    self.tool_blocks[n] = self.block
                if fn.get("arguments"):
                    events.append({"type": "content_block_delta", "index": self.tool_blocks[n],
                                   "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self.stop_reason, self.stop_sequence = _stop(choice, self.stop_sequences)
        return events

    def finish(self) -> list[dict[str, Any]]:
        """At ``[DONE]``: close the open block, then message_delta (stop reason, usage) and message_stop."""
        events = self._start() + self._close_block()
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": self.stop_sequence},
                       "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}})
        events.append({"type": "message_stop"})
        return events
