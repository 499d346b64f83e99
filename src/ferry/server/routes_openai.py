"""OpenAI routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from ferry.disconnect import ClientDisconnected, race_disconnect
from ferry.outputs import CompletionOutput, RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server.app import ServerState, get_state
from ferry.server.errors import OpenAIError, bad_request, validation_error_to_openai
from ferry.server.generation import Generation, engine_error, log_info
from ferry.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    now_s,
    random_id,
)
from ferry.server.responses import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    completion_logprobs_end,
    usage_of,
)
from ferry.server.streaming import SSE_DONE, SSEResponse, sse_event

router = APIRouter()

M = TypeVar("M", bound=BaseModel)

# NOTE: 499 is nginx's "client closed request"; nobody receives it, it only shows in our log line.
_CLIENT_CLOSED = 499


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body validated as ``model``; any problem is a 400 in OpenAI's shape."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error_to_openai(list(exc.errors())) from exc


def check_model(state: ServerState, model: str | None) -> str:
    name = state.served_model_name or ""
    if model is not None and model != name:
        raise OpenAIError(404, f"The model `{model}` does not exist. This server serves `{name}`.",
                          param="model", code="model_not_found")
    return name


def check_prompt(ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int,
                 param: str) -> None:
    """The checks the engine would make, done early so the 400 can name the field."""
    if not ids:
        raise bad_request("The prompt is empty.", param=param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} is out of the vocabulary [0, {vocab_size}).", param=param)
    if len(ids) >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{param} is {len(ids)} tokens, which leaves no room for a completion.",
            param=param, code="context_length_exceeded")
    if params.max_tokens is not None and len(ids) + params.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the {param}, "
            f"{params.max_tokens} in the completion). Please reduce the length of the {param} "
            f"or max_tokens.", param="max_tokens", code="context_length_exceeded")


def sampling_params(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    try:
        return req.to_sampling_params()
    except ValueError as exc:
        # SamplingParams' messages start with the field name ("top_k must be ...").
        first = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=first if first.isidentifier() else None) from exc


def _status_from_stream_error(exc: Exception, request_id: str) -> OpenAIError:
    return exc if isinstance(exc, OpenAIError) else engine_error(exc, request_id)


# --------------------------------------------------------------------------------------------------
# Shared driver


@dataclass
class _Finals:
    """The last cumulative output of each prompt."""

    outputs: list[RequestOutput | None] = field(default_factory=list)

    def done(self) -> list[RequestOutput]:
        return [o for o in self.outputs if o is not None]


async def _collect(gen: Generation) -> list[RequestOutput]:
    finals = _Finals([None] * len(gen.prompts))
    async for i, out in gen.start():
        finals.outputs[i] = out
    return finals.done()


async def _run_blocking(request: Request, gen: Generation) -> list[RequestOutput] | Response:
    """Run to completion, aborting if the client hangs up; returns outputs or a 499 response."""
    gen.admit()
    try:
        try:
            return await race_disconnect(request, _collect(gen))
        except ClientDisconnected:
            info = log_info(request)
            if info is not None:
                info.error = "client disconnected"
            return Response(status_code=_CLIENT_CLOSED)
        except OpenAIError:
            raise
        except Exception as exc:  # the engine failed this request: 400/500, others go on
            raise engine_error(exc, gen.request_id) from exc
    finally:
        await gen.aclose()


async def _prime(request: Request, gen: Generation) -> tuple[Any, tuple[int, RequestOutput] | None]:
    """Start streaming and wait for the first output, so early errors still get a real status."""
    gen.admit()
    try:
        stream = gen.start()
        first = await race_disconnect(request, anext(stream, None))
    except ClientDisconnected:
        await gen.aclose()
        info = log_info(request)
        if info is not None:
            info.error = "client disconnected"
        return None, None
    except OpenAIError:
        await gen.aclose()
        raise
    except Exception as exc:
        await gen.aclose()
        raise engine_error(exc, gen.request_id) from exc
    return stream, first


def _fill_log(request: Request, outputs: list[RequestOutput], gen: Generation) -> None:
    info = log_info(request)
    if info is None:
        return
    usage = usage_of(outputs)
    info.prompt_tokens = usage.prompt_tokens
    info.completion_tokens = usage.completion_tokens
    info.cached_tokens = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    info.ttft_s = gen.ttft


def _engine_and_name(request: Request, model: str | None) -> tuple[ServerState, Any, str]:
    state = get_state(request.app)
    engine = state.require_engine()
    return state, engine, check_model(state, model)


# --------------------------------------------------------------------------------------------------
# /v1/chat/completions


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    req = await parse_body(request, ChatCompletionRequest)
    state, engine, model_name = _engine_and_name(request, req.model)
    params = sampling_params(req)
    try:
        ids = engine.tokenizer.encode_chat(req.template_messages(), add_generation_prompt=True)
    except (ValueError, TemplateError) as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from exc
    check_prompt(ids, params, engine.max_model_len, engine.tokenizer.vocab_size, "messages")
    request_id = random_id("chatcmpl")
    gen = Generation(state, engine, request_id, [ids], params)
    texts = TokenTexts(engine.tokenizer)
    top_k = req.top_logprobs or 0
    created = now_s()

    if not req.stream:
        result = await _run_blocking(request, gen)
        if isinstance(result, Response):
            return result
        _fill_log(request, result, gen)
        out = result[0]
        choices = [ChatChoice(
            index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
            logprobs=(chat_logprobs(texts, c.logprobs or [], top_k) if req.logprobs else None))
            for c in out.outputs]
        body = ChatCompletionResponse(id=request_id, created=created, model=model_name,
                                      choices=choices, usage=usage_of(result))
        return Response(body.model_dump_json(), media_type="application/json")

    stream, first = await _prime(request, gen)
    if stream is None:
        return Response(status_code=_CLIENT_CLOSED)

    async def events() -> Any:
        role_sent: set[int] = set()
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        last: RequestOutput | None = None
        usage_exclude = None if req.include_usage else {"usage"}

        def chunk(choice: ChatChunkChoice) -> str:
            return sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                                 choices=[choice]), exclude=usage_exclude)

        def step(out: RequestOutput) -> list[str]:
            events_: list[str] = []
            for c in out.outputs:
                if c.index in done:
                    continue
                if c.index not in role_sent:
                    role_sent.add(c.index)
                    events_.append(chunk(ChatChunkChoice(
                        index=c.index, delta=DeltaMessage(role="assistant", content=""))))
                delta = c.text[sent_text.get(c.index, 0):]
                if not delta and c.finish_reason is None:
                    continue
                new_lps = (c.logprobs or [])[sent_tokens.get(c.index, 0):]
                sent_text[c.index] = len(c.text)
                sent_tokens[c.index] = len(c.token_ids)
                if c.finish_reason is not None:
                    done.add(c.index)
                events_.append(chunk(ChatChunkChoice(
                    index=c.index, delta=DeltaMessage(content=delta), finish_reason=c.finish_reason,
                    logprobs=chat_logprobs(texts, new_lps, top_k) if req.logprobs else None)))
            return events_

        try:
            if first is not None:
                last = first[1]
                for e in step(first[1]):
                    yield e
            async for _, out in stream:
                last = out
                for e in step(out):
                    yield e
            if req.include_usage and last is not None:
                yield sse_event(ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                                    choices=[], usage=usage_of([last])))
            if last is not None:
                _fill_log(request, [last], gen)
        except Exception as exc:  # reported in-band: the status line is already sent
            yield sse_event(_status_from_stream_error(exc, request_id).body())
        yield SSE_DONE

    return SSEResponse(events(), on_close=gen.aclose)


# --------------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class _PromptInfo:
    ids: list[int]
    text: str


def _completion_prompts(req: CompletionRequest, engine: Any, params: SamplingParams) -> list[_PromptInfo]:
    tok = engine.tokenizer
    out = []
    for i, p in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
            text = p
        else:
            ids = list(p)
            text = tok.decode(ids, skip_special_tokens=False) if req.echo else ""
        check_prompt(ids, params, engine.max_model_len, tok.vocab_size, param)
        out.append(_PromptInfo(ids, text))
    return out


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    req = await parse_body(request, CompletionRequest)
    state, engine, model_name = _engine_and_name(request, req.model)
    params = sampling_params(req)
    prompts = _completion_prompts(req, engine, params)
    request_id = random_id("cmpl")
    gen = Generation(state, engine, request_id, [p.ids for p in prompts], params)
    texts = TokenTexts(engine.tokenizer)
    top_k = req.logprobs or 0
    n = params.n
    created = now_s()

    def echo_prefix(i: int) -> str:
        return prompts[i].text if req.echo else ""

    def logprobs_for(i: int, c: CompletionOutput, start_token: int, first_chunk: bool,
                     offset: int) -> Any:
        if req.logprobs is None:
            return None
        prompt_ids = prompts[i].ids if (req.echo and first_chunk) else ()
        return completion_logprobs(texts, (c.logprobs or [])[start_token:], top_k, offset, prompt_ids)

    if not req.stream:
        result = await _run_blocking(request, gen)
        if isinstance(result, Response):
            return result
        _fill_log(request, result, gen)
        choices = []
        for i, out in enumerate(result):
            for c in out.outputs:
                choices.append(CompletionChoice(
                    index=i * n + c.index, text=echo_prefix(i) + c.text, finish_reason=c.finish_reason,
                    logprobs=logprobs_for(i, c, 0, True, 0)))
        body = CompletionResponse(id=request_id, created=created, model=model_name, choices=choices,
                                  usage=usage_of(result))
        return Response(body.model_dump_json(), media_type="application/json")

    stream, first = await _prime(request, gen)
    if stream is None:
        return Response(status_code=_CLIENT_CLOSED)

    async def events() -> Any:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        done: set[int] = set()
        started: set[int] = set()
        lasts: dict[int, RequestOutput] = {}
        usage_exclude = None if req.include_usage else {"usage"}

        def step(i: int, out: RequestOutput) -> list[str]:
            events_: list[str] = []
            for c in out.outputs:
                idx = i * n + c.index
                if idx in done:
                    continue
                first_chunk = idx not in started
                delta = c.text[sent_text.get(idx, 0):]
                if not delta and c.finish_reason is None and not (first_chunk and req.echo):
                    continue
                started.add(idx)
                text = (echo_prefix(i) if first_chunk else "") + delta
                lp = logprobs_for(i, c, sent_tokens.get(idx, 0), first_chunk, offsets.get(idx, 0))
                if lp is not None:
                    offsets[idx] = completion_logprobs_end(lp, offsets.get(idx, 0))
                sent_text[idx] = len(c.text)
                sent_tokens[idx] = len(c.token_ids)
                if c.finish_reason is not None:
                    done.add(idx)
                events_.append(sse_event(CompletionResponse(
                    id=request_id, created=created, model=model_name,
                    choices=[CompletionChoice(index=idx, text=text, logprobs=lp,
                                              finish_reason=c.finish_reason)]),
                    exclude=usage_exclude))
            return events_

        try:
            if first is not None:
                lasts[first[0]] = first[1]
                for e in step(*first):
                    yield e
            async for i, out in stream:
                lasts[i] = out
                for e in step(i, out):
                    yield e
            finals = list(lasts.values())
            if req.include_usage:
                yield sse_event(CompletionResponse(id=request_id, created=created, model=model_name,
                                                   choices=[], usage=usage_of(finals)))
            _fill_log(request, finals, gen)
        except Exception as exc:  # reported in-band: the status line is already sent
            yield sse_event(_status_from_stream_error(exc, request_id).body())
        yield SSE_DONE

    return SSEResponse(events(), on_close=gen.aclose)


# --------------------------------------------------------------------------------------------------
# /v1/models


def _card(state: ServerState) -> ModelCard:
    engine = state.require_engine()
    return ModelCard(id=state.served_model_name or engine.model_name, created=state.created,
                     root=engine.model_name, max_model_len=engine.max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(get_state(request.app))])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request.app)
    card = _card(state)
    check_model(state, model_id)
    return card
