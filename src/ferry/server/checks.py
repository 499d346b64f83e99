"""Checks of a generation request against the engine, made before it is admitted so that the 400
can name the offending field (the engine would only say that something is wrong)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ferry.openai_errors import bad_request
from ferry.sampling_params import SamplingParams
from ferry.server.protocol import NO_DEFAULTS, ChatCompletionRequest, CompletionRequest
from ferry.server.structured_request import structured_outputs_of


def sampling_params(req: ChatCompletionRequest | CompletionRequest, vocab_size: int,
                    defaults: Mapping[str, Any] = NO_DEFAULTS) -> SamplingParams:
    """The request's ``SamplingParams``; ``defaults`` (the model's generation config) fill the
    fields it leaves unset. Its structured-output constraint (if any) is checked for shape here;
    the engine compiles it, off the event loop."""
    try:
        params = req.to_sampling_params(defaults)
    except ValueError as exc:
        # SamplingParams' messages start with the field name ("top_k must be ...").
        first = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=first if first.isidentifier() else None) from exc
    structured = structured_outputs_of(req)
    if structured is not None:
        params = dataclasses.replace(params, structured_outputs=structured)
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        # NOTE: an id past the vocabulary can never be sampled, so it could never stop anything:
        # the client made a mistake it should hear about (and 10**30 must not reach a tensor).
        raise bad_request(f"Token id {bad[0]} in stop_token_ids is out of the vocabulary "
                          f"[0, {vocab_size}).", param="stop_token_ids")
    return params


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
