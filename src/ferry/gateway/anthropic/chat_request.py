"""An Anthropic Messages request as an OpenAI chat request (the gateway's ``POST /v1/messages``).

The reverse of ``to_messages``: ``system`` becomes a system message, ``tool_use`` blocks become an
assistant's ``tool_calls``, ``tool_result`` blocks become ``tool`` messages, image blocks become
``image_url`` parts. What chat completions cannot carry (extended thinking, documents, server
tools) is refused by name with a 400.
"""

from __future__ import annotations

import json
from typing import Any

from ferry.gateway.anthropic.errors import TranslationError
from ferry.gateway.anthropic.to_messages import text_of


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = str(source.get("url"))
    else:
        raise TranslationError(f"{where}.source: type {source.get('type')!r} is not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages first (they answer the previous turn's
    calls), then one user message with the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}: must be a string or a list of content blocks")
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, f"{where}[{i}]"))
        elif kind == "tool_result":
            text = text_of(block.get("content", ""), f"{where}[{i}].content")
            if block.get("is_error"):
                text = f"Error: {text}"
            tools.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text})
        else:
            raise TranslationError(f"{where}[{i}]: block type {kind!r} is not supported by this gateway")
    out = list(tools)
    if parts:
        plain = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if plain else parts})
    return out


def _assistant(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"{where}: must be a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # NOTE: earlier reasoning is not sent back to chat models
        else:
            raise TranslationError(f"{where}[{i}]: block type {kind!r} is not supported by this gateway")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        out["tools"] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or "input_schema" not in tool or tool.get("type") not in (None, "custom"):
                raise TranslationError(f"tools[{i}]: only client tools with an input_schema are supported")
            fn: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if tool.get("description"):
                fn["description"] = tool["description"]
            out["tools"].append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "auto":
            out["tool_choice"] = "auto"
        elif kind == "any":
            out["tool_choice"] = "required"
        elif kind == "none":
            out["tool_choice"] = "none"
        elif kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        else:
            raise TranslationError(f"tool_choice.type: {kind!r} is not one of auto, any, tool, none")
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat body for a Messages body; ``TranslationError`` names what cannot be carried."""
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise TranslationError(f"{key}: Field required")
    if body.get("thinking") and (body["thinking"] or {}).get("type") != "disabled":
        raise TranslationError("thinking: extended thinking is not supported by this gateway")
    limit = body["max_tokens"]
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise TranslationError(f"max_tokens: must be a positive integer, got {limit!r}")
    if not isinstance(body["messages"], list):
        raise TranslationError("messages: must be a list")
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": text_of(body["system"], "system")})
    for i, turn in enumerate(body["messages"]):
        where = f"messages[{i}].content"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "user":
            messages.extend(_user(turn.get("content"), where))
        elif role == "assistant":
            messages.append(_assistant(turn.get("content"), where))
        else:
            raise TranslationError(f"messages[{i}].role: must be user or assistant, got {role!r}")
    out: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": limit}
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = str(user)
    _tools(body, out)
    return out
