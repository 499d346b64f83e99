"""Pydantic models for every request body, in OpenAI's wire format (responses: ``responses``).

Types are strict, as in OpenAI's API: ``"stream": "yes"``, ``"n": "2"`` or ``"max_tokens": 1.5``
are 400s naming the field, never coerced (an integer still counts as a float).
Requests forbid unknown fields with a value: an unknown field set to something is a feature this
server does not have, and the caller hears so (400) instead of getting a silently different answer.
An unknown field that is null or empty (``tool_calls: null``, ``refusal: null``,
``reasoning_effort: null``, ``functions: []``, as LiteLLM, LangChain and replayed chat histories
send) asks for nothing and is dropped.
Sampling fields a request leaves unset (or null) take the server's defaults (``--generation-config``,
``to_sampling_params(defaults)``), else OpenAI's. The most logprobs a request may ask for is
``--max-logprobs``, given as the validation context ``{"max_logprobs": N}`` (20 without one). Fields OpenAI defines but we do not implement (``tools``,
``logit_bias``, ``suffix``) are declared so that the error
can say exactly that; harmless bookkeeping fields (``user``, ``store``, ``metadata``,
``service_tier``) are accepted and ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ferry.sampling_params import SamplingParams


class ParamError(ValueError):
    """A cross-field validation error that still names the offending field (for OpenAI's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


logger = logging.getLogger(__name__)

_EMPTY: tuple[Any, ...] = (None, [], {})
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default, and OpenAI's top_logprobs bound
NO_DEFAULTS: Mapping[str, Any] = {}


def _check_logprobs(value: int | None, info: ValidationInfo) -> int | None:
    """``logprobs`` / ``top_logprobs`` against the server's ``--max-logprobs``."""
    limit = (info.context or {}).get("max_logprobs", DEFAULT_MAX_LOGPROBS)
    if value is not None and limit >= 0 and value > limit:
        raise ValueError(f"Requested {info.field_name} of {value}, which is greater than the "
                         f"maximum allowed ({limit}, the server's --max-logprobs)")
    return value


class _Request(BaseModel):
    # NOTE: the body comes from ferry.openai_errors.parse_json_object, which already refused
    # NaN/Infinity and overflowing numbers; allow_inf_nan=False keeps Python callers honest too.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_unknowns(cls, data: Any, info: ValidationInfo) -> Any:
        # NOTE: clients serialize every field of their own message type, so a field we do not know
        # often arrives as null/[]/{}; it requests no feature, so it must not cost a 400.
        # The server validates with {"strict_params": False} unless --strict-params: then, as in
        # vLLM, every unknown field is dropped with a warning instead of being a 400.
        if not isinstance(data, dict):
            return data
        lenient = (info.context or {}).get("strict_params") is False
        unknown = [k for k, v in data.items() if k not in cls.model_fields and v not in _EMPTY]
        if unknown and lenient:
            logger.warning("ignored request fields this server does not use: %s", ", ".join(unknown))
        return {k: v for k, v in data.items()
                if k in cls.model_fields or (v not in _EMPTY and not lenient)}


# --------------------------------------------------------------------------------------------------
# Shared request pieces


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: str
    json_schema: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type {v!r} is not supported; use 'text', "
                             "'json_object' or 'json_schema'")
        return v


class _SamplingFields(_Request):
    """Fields shared by chat and completions: OpenAI's sampling options and vLLM's extensions."""

    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1)
    # NOTE: the engine's generators take a signed 64-bit seed; vLLM bounds it the same way.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # NOTE: accepted and ignored: nothing is stored, and there is one service tier.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs (vLLM): read by ferry.server.structured_request, at most one of them.
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # NOTE: accepted, no effect: one backend here

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         defaults: Mapping[str, Any]) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

        def pick(name: str, builtin: float) -> Any:
            value = getattr(self, name)
            return defaults.get(name, builtin) if value is None else value

        top_k = pick("top_k", -1)
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=-1 if top_k == 0 else top_k,
            min_p=pick("min_p", 0.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed,
            stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


# --------------------------------------------------------------------------------------------------
# Chat completions


class TextContentPart(_Request):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text_parts(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content part type {data.get('type')!r} is not supported; only 'text' is")
        return data


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallParam(_Request):
    """An earlier answer's tool call, sent back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_template(self) -> dict[str, Any]:
        # NOTE: templates print arguments with `| tojson` (Qwen2.5, Llama 3.1), which would quote
        # OpenAI's JSON text a second time: a JSON object given as text reaches them as a dict.
        args: Any = self.function.arguments
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": args}}


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # NOTE: an assistant turn copied from an earlier answer may carry its refusal text instead of
    # content; it is what the assistant said, so the template sees it.
    refusal: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers

    @model_validator(mode="before")
    @classmethod
    def _no_function_role(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") == "function":
            raise ValueError("role 'function' (OpenAI's deprecated function calling) is not "
                             "supported; use tools and role 'tool'")
        return data

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template(self) -> dict[str, Any]:
        # NOTE: chat templates know "system", not OpenAI's newer "developer" role.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [c.to_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions for the chat template
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        # NOTE: as vLLM (and OpenAI): tools without tool_choice mean "auto".
        if self.tools and self.tool_choice is None:
            self.tool_choice = "auto"
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ParamError("tool_choice", "When using `tool_choice`, `tools` must be set.")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in [t.function.name for t in self.tools or []]:
                raise ParamError("tool_choice", f"Tool '{name}' has not been passed in `tools`.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError("continue_final_message", "Cannot set both `continue_final_message` "
                             "and `add_generation_prompt` to true.")
        return self

    _max_top_logprobs = field_validator("top_logprobs")(_check_logprobs)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def to_sampling_params(self, defaults: Mapping[str, Any] = NO_DEFAULTS) -> SamplingParams:
        """``defaults``: sampling values for fields the request leaves unset (``max_tokens`` is
        the engine's to apply, capped by the context)."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, defaults)


# --------------------------------------------------------------------------------------------------
# Completions

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # as vLLM, completions take it too

    _max_logprobs = field_validator("logprobs")(_check_logprobs)

    @field_validator("prompt")
    @classmethod
    def _prompt_non_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and (not v or any(isinstance(p, (str, list)) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and v and isinstance(v[0], int) and any(t < 0 for t in v):  # type: ignore[operator]
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "best_of other than n is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, defaults: Mapping[str, Any] = NO_DEFAULTS) -> SamplingParams:
        """As ``ChatCompletionRequest.to_sampling_params``; an unset ``max_tokens`` is 16 (OpenAI's
        default) unless ``defaults`` has one, which the engine applies."""
        unset = "max_tokens" not in self.model_fields_set
        max_tokens = None if unset and "max_tokens" in defaults else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, defaults)


# --------------------------------------------------------------------------------------------------
# Tokenize, detokenize


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = True

    @field_validator("tokens")
    @classmethod
    def _ids_non_negative(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v


# Every request body a route reads, for the OpenAPI document (ferry.openapi_bodies).
REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest,
                                               TokenizeRequest, DetokenizeRequest)
