"""Any OpenAI-compatible API (OpenAI, Azure, Together, Groq, vLLM, llama.cpp, Ollama, …)."""

from __future__ import annotations

from ferry.gateway.backends.base import Backend


class OpenAICompatBackend(Backend):
    """Load is known only from the gateway's own in-flight count; health is ``GET /models``."""
