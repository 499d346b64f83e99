"""Engine outputs -> OpenAI response pieces: usage, chat logprobs, completions logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.outputs import Logprob, RequestOutput
from ferry.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

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
