"""Anthropic's Messages API and OpenAI's Chat Completions, translated both ways.

``to_messages`` turns an OpenAI chat request into a Messages request and ``from_messages`` turns a
Messages answer (whole or streamed) back into OpenAI's shapes: the ``anthropic`` backend kind. The
ingress (``POST /v1/messages``) runs the same mapping the other way round.
"""

from ferry.gateway.anthropic.errors import TranslationError

__all__ = ["TranslationError"]
