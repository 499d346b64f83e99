"""What every backend shares: an HTTP client, its in-flight count, a circuit breaker, load signals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ferry.gateway.circuit import CircuitBreaker
from ferry.gateway.config import BackendConfig, HealthConfig


class UpstreamError(Exception):
    """The upstream failed before it sent anything the client could see: worth another deployment."""

    def __init__(self, backend: str, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{backend}: {kind}: {message}")
        self.backend = backend
        self.kind = kind  # connect | timeout | status | protocol
        self.status = status


@dataclass(frozen=True)
class LoadSignals:
    """What a ferry backend's /metrics says about its load; ``None`` where unknown."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None


class Backend:
    """An OpenAI-compatible upstream. Subclasses add what their kind can tell us (see ferry.py)."""

    def __init__(self, config: BackendConfig, health: HealthConfig, env: Mapping[str, str],
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.name = config.name
        self.location = config.location
        self.inflight = 0
        self.breaker = CircuitBreaker(health.failure_threshold, health.cooldown)
        self.signals = LoadSignals()
        self._health_timeout = health.timeout
        # NOTE: the configured headers first, so a kind's own credentials header always wins
        headers = {**config.resolved_headers(env), **self.auth_headers(env)}
        timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
        # NOTE: the pool must hold max_concurrency streams at once, or requests queue inside httpx
        # where neither the in-flight count nor the client's disconnect can see them.
        limits = httpx.Limits(max_connections=config.max_concurrency + 8,
                              max_keepalive_connections=config.max_concurrency)
        self.client = httpx.AsyncClient(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                        params=self.query_params(), timeout=timeout,
                                        transport=self.wrap_transport(transport, limits), limits=limits)

    def auth_headers(self, env: Mapping[str, str]) -> dict[str, str]:
        """How this kind presents its key: OpenAI's ``Authorization: Bearer``."""
        api_key = env.get(self.config.api_key_env) if self.config.api_key_env else None
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def query_params(self) -> dict[str, str]:
        """Query parameters every request carries (Azure's api-version)."""
        return {}

    def wrap_transport(self, transport: httpx.AsyncBaseTransport | None, limits: httpx.Limits
                       ) -> httpx.AsyncBaseTransport | None:
        """The transport requests go through; a kind that speaks another API translates here."""
        return transport

    @property
    def up(self) -> bool:
        return self.breaker.allows()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` and return the response with its body unread (streamed).

        Raises ``UpstreamError`` for a connect error, a timeout or a 5xx/429, the failures another
        deployment may not share. Other 4xx come back as responses: the request itself is wrong.
        """
        req = self.client.build_request("POST", path, json=body)
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TimeoutException as e:
            raise UpstreamError(self.name, "timeout", str(e) or type(e).__name__) from e
        except httpx.TransportError as e:
            raise UpstreamError(self.name, "connect", str(e) or type(e).__name__) from e
        if resp.status_code >= 500 or resp.status_code == 429:
            try:
                detail = (await resp.aread()).decode(errors="replace")[:300]
            except httpx.HTTPError as e:
                detail = str(e)
            finally:
                await resp.aclose()
            raise UpstreamError(self.name, "status", f"HTTP {resp.status_code}: {detail}", resp.status_code)
        return resp

    def health_url(self) -> str:
        """What ``check_health`` asks: the model list, relative to the base URL."""
        return "models"

    async def check_health(self) -> None:
        """Raise when the backend does not answer; the default asks for its model list."""
        try:
            resp = await self.client.get(self.health_url(), timeout=self._health_timeout)
        except httpx.HTTPError as e:
            raise UpstreamError(self.name, "connect", str(e) or type(e).__name__) from e
        if resp.status_code >= 500:
            raise UpstreamError(self.name, "status", f"HTTP {resp.status_code}", resp.status_code)

    async def scrape(self) -> None:
        """Refresh ``signals``; plain OpenAI-compatible upstreams publish none."""
