"""Token counts that need no tokenizer: upper bounds on a request, and what an answer delivered.

A BPE token (byte-level, or SentencePiece with byte fallback) stands for at least one byte of the
text it encodes, so a string of B UTF-8 bytes is at most B tokens; SentencePiece may add one prefix
token per encoded piece of text, which the per-message overhead covers. What a chat template adds
around the text (BOS, role headers, end-of-turn markers, a default system prompt, the generation
prompt) has no bytes in the request, so it is bounded by two per-model settings:

    prompt <= template_overhead_tokens
              + sum over messages (message_overhead_tokens + bytes of its role and content
                                   + bytes of the JSON of its other fields: name, tool_calls, ...)
              + bytes of the JSON of the body's fields a template may render (tools, ...)

A completions prompt is its bytes plus ``message_overhead_tokens`` per prompt; token-id prompts
count exactly. Images in content parts count as the bytes of their URL, which is no bound on what a
vision model charges for them.
"""

from __future__ import annotations

import json
from typing import Any

# NOTE: body fields that a chat template or the provider may turn into prompt text. Sampling
# parameters are not rendered and are left out, so that they do not inflate every reservation.
PROMPT_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format", "documents",
                 "chat_template", "chat_template_kwargs", "suffix")
# OpenAI's default max_tokens for /v1/completions (vLLM and ferry serve use it too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def string_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in a JSON value."""
    if isinstance(value, str):
        return len(value.encode("utf-8", errors="surrogatepass"))
    if isinstance(value, dict):
        return sum(string_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(string_bytes(v) for v in value)
    return 0


def json_bytes(value: Any) -> int:
    """UTF-8 bytes of a value written as JSON: keys and punctuation too, as templates render tools."""
    try:
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass"))
    except (TypeError, ValueError):
        return string_bytes(value)


def extra_prompt_bytes(body: dict[str, Any]) -> int:
    """Bytes of the body's fields other than messages/prompt that may become prompt text."""
    return sum(json_bytes(body[k]) for k in PROMPT_FIELDS if body.get(k) is not None)


def _message_bytes(message: Any) -> int:
    if not isinstance(message, dict):
        return json_bytes(message)
    rest = {k: v for k, v in message.items() if k not in ("role", "content") and v is not None}
    return string_bytes(message.get("role")) + string_bytes(message.get("content")) + (json_bytes(rest) if rest else 0)


def _prompts(body: dict[str, Any]) -> list[Any]:
    """A completions body's prompts: one string, one token-id list, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    return [prompt]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompt_bound(body: dict[str, Any], endpoint: str, template_overhead: int, message_overhead: int) -> int:
    """The most prompt tokens this body can be, whatever the tokenizer (see the module's formula)."""
    extra = extra_prompt_bytes(body)
    if endpoint == "completions":
        total = 0
        for p in _prompts(body):
            total += len(p) if _is_token_ids(p) and p else string_bytes(p) + message_overhead
        return total + extra
    messages = body.get("messages")
    if not isinstance(messages, list):
        return template_overhead + json_bytes(messages) + extra
    return template_overhead + sum(message_overhead + _message_bytes(m) for m in messages) + extra


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def completion_limit(body: dict[str, Any], endpoint: str) -> int | None:
    """The completion tokens one sequence may produce as the body says; None when it sets none (a
    chat request then runs to its model's limit)."""
    limit = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    if limit is None and endpoint == "completions" and body.get("max_tokens") is None:
        return COMPLETIONS_DEFAULT_MAX_TOKENS
    return limit


def sequences(body: dict[str, Any], endpoint: str) -> int:
    """How many completions the body asks for: ``n`` (or ``best_of``, which is generated and billed)
    for each prompt of a batched completions request."""
    n = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    if endpoint == "completions":
        return n * len(_prompts(body))
    return n


def delivered_tokens(event: Any) -> int:
    """Tokens a stream chunk delivers: one per choice whose delta carries output, as ferry and vLLM
    stream them (a finish_reason alone carries none)."""
    if not isinstance(event, dict):
        return 0
    n = 0
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        if choice.get("text") or (isinstance(delta, dict) and any(
                delta.get(k) for k in ("content", "tool_calls", "function_call", "reasoning_content"))):
            n += 1
    return n


def answer_bytes(answer: Any) -> int:
    """UTF-8 bytes of a JSON answer's choices (text, message content, tool calls): a bound on their tokens."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return 0
    parts = [c.get("text") or {k: v for k, v in m.items() if k != "role"}
             for c in answer["choices"] if isinstance(c, dict) and isinstance(m := c.get("message") or {}, dict)]
    return string_bytes(parts)
