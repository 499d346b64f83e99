"""Operational routes: ``/health``, ``/version``, ``/tokenize``, ``/detokenize``, ``/metrics``.

They stay open without an API key (only ``/v1`` routes need one), like vLLM's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from jinja2 import TemplateError

from ferry.openai_errors import OpenAIError, bad_request, error_body
from ferry.openapi_bodies import request_body
from ferry.server.deps import Engine, State, json_body
from ferry.server.metrics import CONTENT_TYPE
from ferry.server.protocol import DetokenizeRequest, TokenizeRequest
from ferry.server.responses import DetokenizeResponse, TokenizeResponse
from ferry.version import __version__

router = APIRouter()

_tokenize_body = json_body(TokenizeRequest)
_detokenize_body = json_body(DetokenizeRequest)


@router.get("/health")
async def health(state: State) -> Response:
    if state.engine is None:
        message = (f"model failed to load: {state.load_error}" if state.load_error
                   else "model is loading")
        return JSONResponse(error_body(503, message), status_code=503, headers={"Retry-After": "1"})
    if not state.engine.is_running:
        reason = state.engine.dead_reason or "not running"
        return JSONResponse(error_body(503, f"engine is not running: {reason}"), status_code=503)
    return JSONResponse({"status": "ok", "model": state.served_model_name})


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    if state.metrics is None:
        raise OpenAIError(503, "the model is still loading; no metrics yet",
                          headers={"Retry-After": "1"})
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/tokenize", dependencies=[Depends(_tokenize_body.model_name)],
             openapi_extra=request_body(TokenizeRequest))
async def tokenize(req: Annotated[TokenizeRequest, Depends(_tokenize_body.parse)],
                   engine: Engine) -> TokenizeResponse:
    tok = engine.tokenizer
    if req.messages is not None:
        try:
            ids = tok.encode_chat([m.to_template() for m in req.messages],
                                  add_generation_prompt=req.add_generation_prompt)
        except (ValueError, TemplateError) as exc:
            raise bad_request(f"The chat template rejected the messages: {exc}",
                              param="messages") from exc
    else:
        ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", dependencies=[Depends(_detokenize_body.model_name)],
             openapi_extra=request_body(DetokenizeRequest))
async def detokenize(req: Annotated[DetokenizeRequest, Depends(_detokenize_body.parse)],
                     engine: Engine) -> DetokenizeResponse:
    tok = engine.tokenizer
    bad = [t for t in req.tokens if t >= tok.vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} is out of the vocabulary [0, {tok.vocab_size}).",
                          param="tokens")
    return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=req.skip_special_tokens))
