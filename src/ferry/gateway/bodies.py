"""The request bodies the gateway reads, typed strictly where OpenAI defines a field.

The gateway passes a body to its upstream unchanged, so these models only check the fields OpenAI
defines, with OpenAI's strict types (``"stream": "yes"`` or ``"logprobs": "yes"`` is a 400 here,
before a ledger reservation or an upstream is spent on it), and let every other field through
(``extra="allow"``: vLLM extensions, provider-specific options). Ranges are the upstream's to
judge; it answers them in OpenAI's shape and the gateway passes that answer on.

They also describe the inference routes in the gateway's ``/openapi.json``: the routes read
their body in the ``parse`` stage, after authentication, so FastAPI never sees these models itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferry.openai_errors import validation_error_to_openai

MAX_TOKENS = 2**31 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class Message(_Body):
    role: str
    # NOTE: parts pass through as they are (text, images, audio, ...): the upstream knows them.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Common(_Body):
    # NOTE: optional here: a missing or unknown model is resolve_model's 404, as it always was.
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # NOTE: bounded because admission multiplies them into the reservation it stores: 10**30 tokens
    # would overflow the ledger's 64-bit integer column. No model's context comes near 2**31
    # tokens, and OpenAI's own n stops at 128.
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None


class ChatCompletionBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)  # NOTE: reserved like n (see _Common)


class EmbeddingsBody(_Body):
    """OpenAI's embeddings request: text, a list of texts, token ids or lists of token ids."""

    model: str | None = None  # NOTE: as in _Common: a missing model is resolve_model's 404
    # NOTE: OpenAI refuses an empty list (and an empty string); ranges past that are the upstream's
    input: (str | list[str] | list[int] | list[list[int]]) = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=MAX_TOKENS)
    user: str | None = None


BODIES: dict[str, type[BaseModel]] = {"chat/completions": ChatCompletionBody,
                                      "completions": CompletionBody,
                                      "embeddings": EmbeddingsBody}
# the endpoints whose answers may stream (an embeddings body's "stream" is the upstream's to refuse)
STREAMING = ("chat/completions", "completions")


def check_body(endpoint: str, body: dict[str, Any]) -> None:
    """Raise an ``OpenAIError`` 400 naming the field when ``body`` does not fit ``endpoint``."""
    try:
        BODIES[endpoint].model_validate(body)
    except ValidationError as exc:
        raise validation_error_to_openai(list(exc.errors())) from exc
