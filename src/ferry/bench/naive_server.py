"""The naive baseline: Hugging Face ``generate()`` behind the OpenAI chat/completions API.

This is how a first deployment serves a model: one request at a time (a lock around ``generate()``), no
batching, no paged KV cache, tokens streamed through ``TextIteratorStreamer``. ``benchmarks/serving.py``
measures ferry against it. It speaks the same wire format as ferry (SSE streaming, ``stream_options``
usage chunk, ``ignore_eos``), so ``ferry bench`` treats both alike.

torch and transformers are imported only when a model is loaded, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ferry.openai_errors import error_body
from ferry.sse import SSE_DONE, sse_event


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool


@dataclass
class Generation:
    """One running ``generate()``: text pieces arrive on ``streamer``; ``output_len`` is set when it ends."""

    streamer: Any
    thread: threading.Thread
    stop: threading.Event
    prompt_len: int
    output_len: int | None = None
    finish_reason: str = "stop"
    error: Exception | None = None


class NaiveModel:
    """A ``transformers`` causal LM and its tokenizer, from a ``.gguf`` file or an HF folder."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        p = Path(path)
        if p.suffix == ".gguf":
            # NOTE: transformers de-quantizes the GGUF to float32: the same weights ferry serves.
            self.tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        elif p.is_dir():
            self.tokenizer = AutoTokenizer.from_pretrained(str(p))
            self.model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        else:
            raise ValueError(f"model must be a .gguf file or a Hugging Face folder, got {path}")
        self.model.eval()
        self.name = p.stem if p.suffix == ".gguf" else p.name

    def chat_prompt(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                                  tokenize=False)

    def start(self, prompt: str, params: GenParams) -> Generation:
        """Starts ``generate()`` on a thread; the caller reads ``streamer`` and then joins ``thread``."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        prompt_len = int(enc["input_ids"].shape[1])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class _StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                # NOTE: set when the client goes away, so an abandoned request frees the lock early.
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        kwargs: dict[str, Any] = dict(
            **enc, max_new_tokens=params.max_tokens, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent()]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_tokens
        def work() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    out = self.model.generate(**kwargs)
                gen.output_len = int(out.shape[1]) - prompt_len
                gen.finish_reason = "length" if gen.output_len >= params.max_tokens else "stop"
            except Exception as e:  # NOTE: handed to the request handler, which answers with it
                gen.error = e
                streamer.end()

        gen = Generation(streamer=streamer, thread=threading.Thread(target=work, daemon=True, name="naive-generate"),
                         stop=stop, prompt_len=prompt_len)
        gen.thread.start()
        return gen


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message))


def _params(req: _Sampling, default_max: int) -> GenParams:
    return GenParams(max_tokens=req.max_completion_tokens or req.max_tokens or default_max,
                     temperature=req.temperature, top_p=req.top_p, seed=req.seed, ignore_eos=req.ignore_eos)


def create_app(model: NaiveModel, served_name: str | None = None) -> FastAPI:
    """The baseline's FastAPI app; one ``generate()`` at a time, whatever the number of clients."""
    app = FastAPI(title="naive transformers baseline")
    name = served_name or model.name
    lock = asyncio.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "naive"}]}

    # NOTE: only the process collector (RSS, CPU seconds), in the app's own registry, so that
    # `ferry bench` reports this server's memory as it does vLLM's and ferry's.
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        return await _serve(req, model.chat_prompt(req.messages), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await _serve(req, req.prompt, chat=False)

    async def _serve(req: _Sampling, prompt: str, chat: bool) -> Any:
        params = _params(req, default_max=256 if chat else 16)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(prompt, params, chat, rid, usage), media_type="text/event-stream")
        async with lock:
            gen = model.start(prompt, params)
            text = "".join([piece async for piece in _pieces(gen)])
            await asyncio.to_thread(gen.thread.join)
        if gen.error is not None:
            return _error(500, f"generation failed: {gen.error}")
        usage_body = _usage(gen)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": gen.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": gen.finish_reason, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": name, "choices": [choice], "usage": usage_body}

    async def _stream(prompt: str, params: GenParams, chat: bool, rid: str, usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices, **(extra or {})}
            return sse_event(body)

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        async with lock:
            gen = model.start(prompt, params)
            try:
                if chat:
                    yield chunk([choice(None, None, first=True)])
                async for piece in _pieces(gen):
                    yield chunk([choice(piece, None)])
            finally:
                gen.stop.set()  # NOTE: the client left (or we finished): stop generate() and free the lock
                await asyncio.to_thread(gen.thread.join)
            if gen.error is not None:
                yield sse_event(error_body(500, f"generation failed: {gen.error}"))
                return
            yield chunk([choice(None, gen.finish_reason)])
            if usage:
                yield chunk([], {"usage": _usage(gen)})
            yield SSE_DONE

    return app


async def _pieces(gen: Generation) -> AsyncIterator[str]:
    """Text pieces from the streamer, read off the event loop (the streamer's queue blocks)."""
    it = iter(gen.streamer)
    done = object()
    while True:
        piece = await asyncio.to_thread(next, it, done)
        if piece is done:
            return
        if piece:
            yield piece


def _usage(gen: Generation) -> dict[str, int]:
    out = gen.output_len or 0
    return {"prompt_tokens": gen.prompt_len, "completion_tokens": out, "total_tokens": gen.prompt_len + out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="naive baseline: transformers generate() behind the OpenAI API")
    parser.add_argument("--model", required=True, help="a .gguf file or a Hugging Face folder")
    parser.add_argument("--served-model-name", help="name in /v1/models (default: the file or folder name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    import uvicorn

    app = create_app(NaiveModel(args.model, threads=args.threads), args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
