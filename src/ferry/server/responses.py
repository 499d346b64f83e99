"""OpenAI's response bodies: the pydantic models, and the pieces built from engine outputs (usage,
chat logprobs, completions logprobs). The request models are in ``protocol``."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from ferry.outputs import Logprob, RequestOutput


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    """A streamed piece of a tool call: the first one has id, type and name; later ones only
    arguments, to be appended."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class _OmitsNoToolCalls(_Response):
    """Leaves ``tool_calls`` out unless there are some (as OpenAI does)."""

    @model_serializer(mode="wrap")
    def _omit_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatResponseMessage(_OmitsNoToolCalls):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(_OmitsNoToolCalls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ferry"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


# --------------------------------------------------------------------------------------------------
# Builders

# NOTE: JSON has no -inf; vLLM clamps to the same floor so clients can sum logprobs safely.
_LOGPROB_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


def usage_of(outputs: Sequence[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


@dataclass
class TokenTexts:
    """Token id -> its text, as OpenAI shows tokens in logprobs (decoded alone, specials kept)."""

    tokenizer: Any
    cache: dict[int, str] = field(default_factory=dict)

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[Logprob], top_k: int) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        token = texts(lp.token_id)
        tops = [TopLogprob(token=texts(tid), logprob=_finite(v), bytes=list(texts(tid).encode()))
                for tid, v in list(lp.top.items())[:top_k]]
        content.append(ChatTokenLogprob(token=token, logprob=_finite(lp.logprob),
                                        bytes=list(token.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_logprobs(texts: TokenTexts, logprobs: Sequence[Logprob], top_k: int,
                        text_offset: int, prompt_ids: Sequence[int] = ()) -> CompletionLogprobs:
    """Legacy completions logprobs; echoed prompt tokens come first with null logprobs."""
    out = CompletionLogprobs()
    offset = text_offset
    for tid in prompt_ids:
        token = texts(tid)
        out.tokens.append(token)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(offset)
        offset += len(token)
    for lp in logprobs:
        token = texts(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_finite(lp.logprob))
        top: dict[str, float] = {}
        for tid, v in list(lp.top.items())[:top_k]:
            top.setdefault(texts(tid), _finite(v))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def completion_logprobs_end(lp: CompletionLogprobs, start: int) -> int:
    """The text offset just after the last token of ``lp`` (where the next chunk continues)."""
    if not lp.tokens:
        return start
    return lp.text_offset[-1] + len(lp.tokens[-1])
