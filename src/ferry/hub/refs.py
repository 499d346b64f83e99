"""What names a Hub model: ``org/name``, optionally ``:TAG`` (a quant tag or a .gguf file name)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ferry.hub.errors import HubError

# NOTE: the Hub's own rule for names (huggingface_hub.utils.validate_repo_id): letters, digits, '-',
# '_', '.'; no leading/trailing '-' or '.', no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?::(?P<tag>[\w.+-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A parsed model reference: ``repo_id`` and the tag after ``:`` (None when absent)."""

    repo_id: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.tag}" if self.tag else self.repo_id


def is_repo_id(text: str) -> bool:
    """``org/name`` or ``org/name:TAG`` that is not an existing local path."""
    match = _REPO_ID.match(text.strip())
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return False
    return not Path(text).expanduser().exists()


def parse_ref(text: str) -> HubRef:
    """``org/name[:TAG]`` -> HubRef; HubError when it is not a repo id."""
    match = _REPO_ID.match(text.strip())
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        raise HubError(f"{text!r} is not a Hugging Face repo id (expected org/name or org/name:QUANT)")
    return HubRef(match["repo"], match["tag"])


def is_commit_hash(revision: str) -> bool:
    return bool(_COMMIT.match(revision))
