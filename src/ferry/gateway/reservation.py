"""How much a request may use at most: the reservation its pending ledger row holds.

For each deployment the request's data class allows:

    prompt      = the backend's own count (``POST /tokenize`` on a ferry or vLLM backend: the chat
                  template applied, exactly what it will bill) + bytes of fields it cannot count
                  (tools, ...), or else ``token_bounds.prompt_bound``
    completion  = max_completion_tokens / max_tokens, or without one, the backend's context left after
                  the prompt (``max_model_len`` from /tokenize), or else the model's
                  ``max_output_tokens``; times ``n`` (``best_of``) and the number of prompts
    cost        = prompt x input price + completion x output price of that deployment

An embeddings request holds its ``input``'s bound (``input_bound``) at the dearest input price and
no completion tokens.

The reservation is the largest of each over the deployments, so it holds wherever the router
sends the request. Counting with a backend costs a round trip, so it is done only for callers whose
key has a TPM limit or a budget (``exact``); the others reserve the byte bound, which limits nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ferry.gateway.backends import Backend
from ferry.gateway.config import DeploymentConfig, GatewayConfig, ModelRoute
from ferry.gateway.ledger import cost_usd
from ferry.gateway.limits import Estimate
from ferry.gateway.token_bounds import (
    completion_limit,
    extra_prompt_bytes,
    prompt_bound,
    sequences,
    string_bytes,
)


@dataclass(frozen=True)
class Counted:
    """A backend's answer to /tokenize: the prompt's tokens and, when it says, its context length."""

    tokens: int
    context: int | None


def tokenize_url(base_url: str) -> str:
    """``/tokenize`` sits beside ``/v1`` on ferry serve and vLLM, not under it."""
    return base_url.rstrip("/").removesuffix("/v1") + "/tokenize"


class Reserver:
    def __init__(self, config: GatewayConfig, backends: Mapping[str, Backend]) -> None:
        self._config = config
        self._backends = backends
        # NOTE: a backend that answered 404/405 has no /tokenize (an older server, a proxy in front):
        # asking again on every request would only add a round trip. Instance state, per gateway.
        self._no_tokenize: set[str] = set()

    async def estimate(self, body: dict[str, Any], endpoint: str, route: ModelRoute, locations: tuple[str, ...],
                       exact: bool) -> Estimate:
        deployments = [(d, self._backends[d.backend]) for d in route.deployments
                       if (b := self._config.backend(d.backend)).location in locations and b.serves(endpoint)]
        if endpoint == "embeddings":
            return _embeddings(body, route, deployments)
        counts = await asyncio.gather(*(self._count(b, d.model, body, endpoint) if exact else _none()
                                        for d, b in deployments))
        bound = prompt_bound(body, endpoint, route.template_overhead_tokens, route.message_overhead_tokens)
        extra = extra_prompt_bytes(body)
        limit = completion_limit(body, endpoint)
        seqs = sequences(body, endpoint)
        prompt_most, completion_most, cost_most = (bound if not deployments else 0), 0, 0.0
        for (d, b), counted in zip(deployments, counts):
            prompt = counted.tokens + extra if counted is not None else bound
            per_seq = limit
            if per_seq is None:
                per_seq = (max(1, counted.context - counted.tokens) if counted is not None and counted.context
                           else route.max_output_tokens)
            completion = per_seq * seqs
            price_in, price_out = _prices(d, b)
            prompt_most = max(prompt_most, prompt)
            completion_most = max(completion_most, completion)
            cost_most = max(cost_most, cost_usd(prompt, completion, price_in, price_out))
        if not deployments:
            completion_most = (limit or route.max_output_tokens) * seqs
        return Estimate(prompt_most, completion_most, cost_most)

    async def _count(self, backend: Backend, model: str, body: dict[str, Any], endpoint: str) -> Counted | None:
        """The backend's own prompt count, or None when it cannot give one (then the bound is used)."""
        if backend.config.kind != "ferry" or backend.name in self._no_tokenize or not backend.up:
            return None
        if endpoint == "chat/completions":
            if not isinstance(body.get("messages"), list):
                return None
            payload: dict[str, Any] = {"model": model, "messages": body["messages"], "add_generation_prompt": True}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                return None  # NOTE: token ids count exactly in the bound; batches are left to it
            payload = {"model": model, "prompt": prompt}
        try:
            resp = await backend.client.post(tokenize_url(backend.config.url), json=payload,
                                             timeout=self._config.health.timeout)
        except httpx.HTTPError:
            return None
        if resp.status_code in (404, 405):
            self._no_tokenize.add(backend.name)
            return None
        if resp.status_code != 200:
            return None  # NOTE: e.g. a 400 for messages its template rejects; upstream will say so too
        try:
            data = resp.json()
        except ValueError:
            return None
        count, context = (data.get("count"), data.get("max_model_len")) if isinstance(data, dict) else (None, None)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
        valid_context = isinstance(context, int) and not isinstance(context, bool) and context > 0
        return Counted(count, context if valid_context else None)


def input_bound(body: dict[str, Any], message_overhead: int) -> int:
    """The most tokens an embeddings ``input`` can be: token ids count exactly, a text at most its
    UTF-8 bytes plus the per-message overhead (a BOS, a SentencePiece prefix)."""
    value = body.get("input")
    items = value if isinstance(value, list) and value and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value) else [value]
    total = 0
    for item in items:
        if isinstance(item, list):
            total += len(item)
        else:
            total += string_bytes(item) + message_overhead
    return total


def _embeddings(body: dict[str, Any], route: ModelRoute, deployments: list[tuple[DeploymentConfig, Backend]]
                ) -> Estimate:
    """An embeddings request holds its input's bound, priced at the dearest input price; it has no
    completion tokens."""
    prompt = input_bound(body, route.message_overhead_tokens)
    price = max((_prices(d, b)[0] for d, b in deployments), default=0.0)
    return Estimate(prompt, 0, cost_usd(prompt, 0, price, 0.0))


async def _none() -> None:
    return None


def _prices(d: DeploymentConfig, b: Backend) -> tuple[float, float]:
    return (d.input_per_mtok if d.input_per_mtok is not None else b.config.input_per_mtok,
            d.output_per_mtok if d.output_per_mtok is not None else b.config.output_per_mtok)
