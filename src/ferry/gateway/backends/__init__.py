"""Upstream backends, one file per kind; ``make_backend`` imports the one a config names."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import httpx

from ferry.gateway.backends.base import Backend, UpstreamError
from ferry.gateway.config import BackendConfig, HealthConfig

_KINDS = {"openai": ("ferry.gateway.backends.openai_compat", "OpenAICompatBackend"),
          "ferry": ("ferry.gateway.backends.ferry", "FerryBackend"),
          "azure": ("ferry.gateway.backends.azure", "AzureBackend"),
          "anthropic": ("ferry.gateway.backends.anthropic", "AnthropicBackend")}


def make_backend(config: BackendConfig, health: HealthConfig, env: Mapping[str, str],
                 transport: httpx.AsyncBaseTransport | None = None) -> Backend:
    module, cls = _KINDS[config.kind]
    return getattr(importlib.import_module(module), cls)(config, health, env, transport)


__all__ = ["Backend", "UpstreamError", "make_backend"]
