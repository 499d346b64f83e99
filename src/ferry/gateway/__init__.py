"""`ferry gateway`: one OpenAI-compatible endpoint over on-prem replicas and cloud APIs."""

from __future__ import annotations

from typing import Any

from ferry.gateway.config import ConfigError, GatewayConfig, load_config, parse_config

__all__ = ["ConfigError", "GatewayConfig", "create_app", "load_config", "parse_config"]


def __getattr__(name: str) -> Any:
    # NOTE: `ferry gateway check` must not pay for FastAPI; the app is imported when asked for.
    if name == "create_app":
        from ferry.gateway.app import create_app

        return create_app
    raise AttributeError(name)
