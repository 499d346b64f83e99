"""Models from the Hugging Face Hub: repo ids and quant tags -> local files (huggingface_hub cache).

``resolve("Qwen/Qwen2.5-1.5B-Instruct")`` -> the snapshot folder (config, tokenizer, safetensors);
``resolve("org/Model-GGUF:Q4_K_M")`` -> that quant's .gguf (the first shard of a split one). Only the
files ferry reads are downloaded. ``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``
apply as in huggingface_hub; ``download_dir`` replaces the cache folder (vLLM's ``--download-dir``).
Errors are ``HubError`` with a one-line message.
"""

from __future__ import annotations

from ferry.hub.cache import CachedModel, CachedQuant, Removed, list_cached, remove
from ferry.hub.download import cache_dir, resolve, resolve_config
from ferry.hub.errors import (
    AmbiguousFileError,
    FileNotInRepoError,
    HubAuthError,
    HubError,
    HubOfflineError,
    NotCachedError,
    RepoNotFoundError,
)
from ferry.hub.files import CONFIG_FILES, TOKENIZER_FILES
from ferry.hub.refs import HubRef, is_repo_id, parse_ref

__all__ = ["CONFIG_FILES", "TOKENIZER_FILES", "AmbiguousFileError", "CachedModel", "CachedQuant",
           "FileNotInRepoError", "HubAuthError", "HubError", "HubOfflineError", "HubRef",
           "NotCachedError", "Removed", "RepoNotFoundError", "cache_dir", "is_repo_id", "list_cached",
           "parse_ref", "remove", "resolve", "resolve_config"]
