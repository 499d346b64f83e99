"""``/v1/chat/completions``: chat messages -> the chat template -> one generation, blocking or SSE.

With tools, a ``ToolPlan`` (``tool_parsers.plan``) says what the template sees, which grammar forces
a call and how each choice's text is read back; every choice then has its own extractor, fed the
whole text (blocking) or each delta (streaming), so both answers hold the same calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from jinja2 import TemplateError

from ferry.openai_errors import bad_request
from ferry.openapi_bodies import request_body
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server.checks import check_prompt, sampling_params
from ferry.server.deltas import ChoiceDelta, DeltaTracker
from ferry.server.deps import Engine, State, json_body
from ferry.server.driver import fill_log, run_blocking, stream_response
from ferry.server.generation import Generation
from ferry.server.protocol import ChatCompletionRequest
from ferry.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    TokenTexts,
    ToolCallOut,
    chat_logprobs,
    now_s,
    random_id,
    usage_of,
)
from ferry.server.tool_parsers.base import (
    CallDelta,
    Content,
    Event,
    ToolCallExtractor,
    run_all,
)
from ferry.server.tool_parsers.plan import ToolChoiceError, ToolPlan, plan_tools
from ferry.sse import sse_event

router = APIRouter()

_body = json_body(ChatCompletionRequest)
# template variables a request may not set through chat_template_kwargs
_RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message"})


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(
        request: Request, req: Annotated[ChatCompletionRequest, Depends(_body.parse)], state: State,
        engine: Engine, model_name: Annotated[str, Depends(_body.model_name)]) -> Response:
    try:
        plan = plan_tools(req, state.config, getattr(engine.tokenizer, "chat_template", None))
    except ToolChoiceError as exc:
        raise bad_request(str(exc), param=exc.param) from exc
    params = _with_tools(sampling_params(req, engine.tokenizer.vocab_size, state.generation_defaults),
                         plan)
    try:
        ids = _prompt_ids(req, engine.tokenizer, plan)
    except (ValueError, TemplateError) as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc
    check_prompt(ids, params, engine.max_model_len, engine.tokenizer.vocab_size, "messages")
    request_id = random_id("chatcmpl")
    gen = Generation(state, engine, request_id, [ids], params)
    texts = TokenTexts(engine.tokenizer)
    top_k = req.top_logprobs or 0
    created = now_s()

    if not req.stream:
        result = await run_blocking(request, gen)
        if isinstance(result, Response):
            return result
        choices = []
        for c in result[0].outputs:
            message, finish = _message(plan, c.text, c.finish_reason)
            choices.append(ChatChoice(
                index=c.index, message=message, finish_reason=finish,
                logprobs=(chat_logprobs(texts, c.logprobs or [], top_k) if req.logprobs else None)))
        body = ChatCompletionResponse(id=request_id, created=created, model=model_name,
                                      choices=choices, usage=usage_of(result))
        return Response(body.model_dump_json(), media_type="application/json")

    tracker = DeltaTracker(params.n)
    usage_exclude = None if req.include_usage else {"usage"}
    choice_tools = _ChoiceTools(plan)

    def chunk(choice: ChatChunkChoice) -> str:
        return sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                             choices=[choice]), exclude=usage_exclude)

    def on_output(prompt: int, out: RequestOutput) -> Iterator[str]:
        for d in tracker.update(prompt, out):
            if d.first:
                yield chunk(ChatChunkChoice(index=d.index,
                                            delta=DeltaMessage(role="assistant", content="")))
            if not d.send:
                continue
            logprobs = chat_logprobs(texts, d.logprobs, top_k) if req.logprobs else None
            if plan.extractor is None:
                yield chunk(ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text),
                                            finish_reason=d.finish_reason, logprobs=logprobs))
                continue
            deltas, finish = choice_tools.update(d)
            for i, delta in enumerate(deltas):
                yield chunk(ChatChunkChoice(index=d.index, delta=delta,
                                            finish_reason=finish if i == len(deltas) - 1 else None,
                                            logprobs=logprobs if i == 0 else None))

    def on_end(finals: list[RequestOutput]) -> Iterator[str]:
        if not finals:
            return
        if req.include_usage:
            yield sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                                choices=[], usage=usage_of(finals)))
        fill_log(request, finals, gen)

    return await stream_response(request, gen, on_output, on_end)


def _prompt_ids(req: ChatCompletionRequest, tokenizer: Any, plan: ToolPlan) -> list[int]:
    """The prompt: the messages through the chat template, with the tools, documents and the
    request's ``chat_template_kwargs`` as template variables (vLLM's order: those kwargs last)."""
    kwargs: dict[str, Any] = {}
    if plan.template_tools is not None:
        kwargs["tools"] = plan.template_tools
    if req.documents is not None:
        kwargs["documents"] = req.documents
    extra = req.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_KWARGS & extra.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {reserved[0]!r}; it is a request field "
                          "or the messages", param="chat_template_kwargs")
    kwargs.update(extra)
    messages = req.template_messages()
    if not req.continue_final_message:
        # NOTE: no keyword arguments unless there are some: an embedder's tokenizer may take none.
        return tokenizer.encode_chat(messages, add_generation_prompt=req.add_generation_prompt,
                                     **kwargs)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    final = str(messages[-1].get("content") or "").strip()
    at = text.rfind(final) if final else -1
    if messages[-1]["role"] != "assistant" or at < 0:
        raise bad_request("continue_final_message needs a final assistant message with content "
                          "that the chat template shows", param="continue_final_message")
    # NOTE: as transformers: the prompt ends where the final message's text does, so the model
    # goes on writing it instead of starting a new turn.
    return tokenizer.encode(text[:at + len(final)], add_special_tokens=False)


def _with_tools(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    if plan.structured_outputs is not None:
        if params.structured_outputs is not None:
            raise bad_request("tool_choice 'required' or a named function already constrains the "
                              "output; it cannot be combined with response_format or "
                              "structured_outputs", param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=plan.structured_outputs)
    if plan.keep_special_tokens and params.skip_special_tokens:
        # NOTE: the parser's markers ([TOOL_CALLS], <|python_tag|>) are special tokens.
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params


def _finish(plan: ToolPlan, finish_reason: str | None, called: bool) -> str | None:
    """A choice that called tools and stopped by itself finishes with "tool_calls" (OpenAI); a
    forced named call keeps "stop", as OpenAI's and vLLM's do."""
    return "tool_calls" if called and plan.calls_finish and finish_reason == "stop" else finish_reason


def _message(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
    if plan.extractor is None:
        return ChatResponseMessage(content=text), finish_reason
    got = run_all(plan.extractor(), text)
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in got.tool_calls]
    return (ChatResponseMessage(content=got.content, tool_calls=calls or None),
            _finish(plan, finish_reason, bool(calls)))


class _ChoiceTools:
    """One extractor per streamed choice: its deltas -> OpenAI delta messages."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._extractors: dict[int, ToolCallExtractor] = {}
        self._called: set[int] = set()

    def update(self, d: ChoiceDelta) -> tuple[list[DeltaMessage], str | None]:
        """The delta messages for ``d`` and, when it ends its choice, the finish reason."""
        factory = self._plan.extractor
        if factory is None:
            raise RuntimeError("no extractor: the plan has no tool parsing")
        extractor = self._extractors.setdefault(d.index, factory())
        events = extractor.feed(d.text)
        if d.finish_reason is not None:
            events += extractor.finish()
        if any(isinstance(e, CallDelta) for e in events):
            self._called.add(d.index)
        deltas = [_delta(e) for e in events]
        if not deltas and (d.finish_reason is not None or d.logprobs):
            deltas = [DeltaMessage()]
        return deltas, _finish(self._plan, d.finish_reason, d.index in self._called)


def _delta(event: Event) -> DeltaMessage:
    if isinstance(event, Content):
        return DeltaMessage(content=event.text)
    if event.id is not None:
        return DeltaMessage(tool_calls=[DeltaToolCall(
            index=event.index, id=event.id, type="function",
            function=DeltaFunctionCall(name=event.name, arguments=event.arguments))])
    return DeltaMessage(tool_calls=[DeltaToolCall(
        index=event.index, function=DeltaFunctionCall(arguments=event.arguments))])
