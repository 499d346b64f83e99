"""An OpenAI chat request as an Anthropic Messages request (the ``anthropic`` backend kind).

System and developer messages become the top-level ``system``; tool results become ``tool_result``
blocks of a user turn; assistant tool calls become ``tool_use`` blocks; image URLs become image
blocks (base64 for ``data:`` URLs). Consecutive turns of one role merge into one, as the API wants.
What Anthropic cannot express (n > 1, logprobs, logit_bias, penalties, JSON modes) is refused by
name rather than dropped, so a client never gets an answer to a different question.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ferry.gateway.anthropic.errors import TranslationError

# Anthropic requires max_tokens; a chat request without a limit gets this one
DEFAULT_MAX_TOKENS = 4096
_DATA_URL = re.compile(r"data:(?P<type>[\w/+.-]+);base64,(?P<data>.*)", re.S)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if (body.get("n") or 1) != 1:
        raise TranslationError("n: an anthropic backend answers one choice per request (n=1)")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise TranslationError("logprobs: an anthropic backend does not return logprobs")
    if body.get("logit_bias"):
        raise TranslationError("logit_bias: not offered by an anthropic backend")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key):
            raise TranslationError(f"{key}: not offered by an anthropic backend")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise TranslationError(f"response_format {fmt.get('type')}: not offered by an anthropic backend")


def text_of(content: Any, where: str) -> str:
    """A content that must be text: a string, or a list of ``{"type": "text", "text": ...}`` parts
    (both APIs spell text parts alike); None is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError(f"{where}[{i}]: only text is accepted here")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise TranslationError(f"{where}: content must be a string or a list of text parts")


def _image(url: str, where: str) -> dict[str, Any]:
    if m := _DATA_URL.fullmatch(url):
        return {"type": "image", "source": {"type": "base64", "media_type": m["type"], "data": m["data"]}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"{where}: an image must be a data: or http(s) URL")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_image(str(url or ""), f"{where}[{i}]"))
        else:
            raise TranslationError(f"{where}[{i}]: part type {kind!r} cannot be sent to an anthropic backend")
    return blocks


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"), f"{where}.content")
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise TranslationError(f"{where}.tool_calls[{j}]: a function call needs a name")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError as e:
            raise TranslationError(f"{where}.tool_calls[{j}].function.arguments: not JSON: {e}") from e
        if not isinstance(arguments, dict):
            raise TranslationError(f"{where}.tool_calls[{j}].function.arguments: must be a JSON object")
        blocks.append({"type": "tool_use", "id": str(call.get("id") or f"toolu_{j}"), "name": fn["name"],
                       "input": arguments})
    return blocks


def _messages(messages: list[Any]) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.append(text_of(message.get("content"), f"{where}.content"))
        elif role == "user":
            add("user", _user_blocks(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            add("assistant", _assistant_blocks(message, where))
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or ""),
                          "content": text_of(message.get("content"), f"{where}.content")}])
        else:
            raise TranslationError(f"{where}.role: {role!r} cannot be sent to an anthropic backend")
    if not turns:
        raise TranslationError("messages: an anthropic backend needs at least one user or assistant message")
    return ("\n\n".join(s for s in system if s) or None), turns


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        out["tools"] = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or tool.get("type", "function") != "function":
                raise TranslationError(f"tools[{i}]: only function tools can be sent to an anthropic backend")
            entry = {"name": fn.get("name"), "input_schema": fn.get("parameters") or {"type": "object"}}
            if fn.get("description"):
                entry["description"] = fn["description"]
            out["tools"].append(entry)
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    mapped: dict[str, Any] | None = None
    if choice == "auto" or (choice is None and tools and parallel is False):
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not name:
            raise TranslationError("tool_choice: a named tool choice needs function.name")
        mapped = {"type": "tool", "name": name}
    if mapped is not None and tools:
        if parallel is False and mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
        out["tool_choice"] = mapped


def messages_request(body: dict[str, Any]) -> dict[str, Any]:
    """The Messages body for an OpenAI chat body (``model`` as the gateway set it)."""
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages: must be a list")
    system, turns = _messages(messages)
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": limit, "messages": turns}
    if system:
        out["system"] = system
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    _tools(body, out)
    return out
