"""The one-line errors of ``ferry.hub``: what went wrong and what to do, never a traceback."""

from __future__ import annotations


class HubError(ValueError):
    """A Hub model cannot be had; the message is the one line shown to the user."""


class RepoNotFoundError(HubError):
    """The repo (or the revision) does not exist on the Hub."""


class HubAuthError(HubError):
    """401 or a gated repo: a token is missing, wrong, or lacks access."""


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE``) or the Hub is unreachable, and the files are not cached."""


class FileNotInRepoError(HubError):
    """No file of the repo fits the request: a quant tag, a gguf file name, or no weights at all."""


class AmbiguousFileError(HubError):
    """Several files fit the request; the message lists them."""


class NotCachedError(HubError):
    """``ferry rm`` of a model that is not in the cache."""
