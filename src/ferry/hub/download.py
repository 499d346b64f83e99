"""Hub repo ids -> local files in the huggingface_hub cache, downloading only what ferry reads.

One listing call (``model_info``) names the repo's files and pins the commit; each needed file is
then fetched at that commit with ``hf_hub_download`` (a cached file costs no request). Offline
(``HF_HUB_OFFLINE``), or when the Hub cannot be reached, the listing comes from the cached snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import silent_tqdm

from ferry.hub.errors import (
    FileNotInRepoError,
    HubAuthError,
    HubError,
    HubOfflineError,
    RepoNotFoundError,
)
from ferry.hub.files import (
    SAFETENSORS_INDEX,
    is_gguf_repo,
    safetensors_metadata_files,
    safetensors_weight_files,
    select_gguf,
)
from ferry.hub.refs import HubRef, is_commit_hash, parse_ref

logger = logging.getLogger(__name__)
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login` (`huggingface-cli login`)"


def cache_dir(download_dir: str | None = None) -> Path:
    """``download_dir`` (vLLM's ``--download-dir``), else huggingface_hub's cache (HF_HUB_CACHE/HF_HOME)."""
    return Path(download_dir or constants.HF_HUB_CACHE).expanduser().resolve()


def resolve(model: str, *, revision: str | None = None, download_dir: str | None = None,
            gguf_file: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Download what is missing; the snapshot folder (safetensors repo) or the .gguf (first shard).

    ``allow_patterns`` (fnmatch patterns) replaces the selection: only matching files are fetched
    and the folder is returned.
    """
    ref = parse_ref(model)
    repo = _Repo.open(ref, revision, cache_dir(download_dir))
    if allow_patterns is not None:
        wanted = [f for f in repo.files if any(fnmatch(f, p) for p in allow_patterns)]
        if not wanted:
            raise FileNotInRepoError(f"no file of {ref.repo_id!r} matches {', '.join(allow_patterns)}"
                                     f"{repo.cached_note}")
        repo.fetch(wanted)
        return repo.snapshot
    if is_gguf_repo(repo.files, ref.tag, gguf_file):
        return repo.fetch_gguf(ref, gguf_file)
    metadata = safetensors_metadata_files(ref.repo_id, repo.files)
    repo.fetch(metadata)
    repo.fetch(safetensors_weight_files(ref.repo_id, repo.files, repo.read_index()))
    return repo.snapshot


def resolve_config(model: str, *, revision: str | None = None, download_dir: str | None = None,
                   gguf_file: str | None = None) -> Path:
    """What a shape is read from, fetching nothing more: ``config.json`` of a safetensors repo, or
    the chosen quant's .gguf (first shard) of a GGUF repo."""
    ref = parse_ref(model)
    repo = _Repo.open(ref, revision, cache_dir(download_dir))
    if is_gguf_repo(repo.files, ref.tag, gguf_file):
        return repo.fetch_gguf(ref, gguf_file)
    safetensors_metadata_files(ref.repo_id, repo.files)  # NOTE: same checks as a full resolve
    repo.fetch(["config.json"])
    return repo.snapshot / "config.json"


@dataclass
class _Repo:
    """One repo at one commit: its file list and the cache snapshot its files land in."""

    ref: HubRef
    revision: str  # as asked ("main" when none)
    commit: str
    files: dict[str, int | None]  # repo path -> size in bytes (None when unknown)
    storage: Path  # <cache>/models--org--name
    offline_reason: str | None  # why the listing came from the cache; None when online

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    @property
    def cached_note(self) -> str:
        return f" (offline: only cached files considered, {self.offline_reason})" if self.offline_reason else ""

    @classmethod
    def open(cls, ref: HubRef, revision: str | None, cache: Path) -> _Repo:
        revision = revision or constants.DEFAULT_REVISION
        storage = cache / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        try:
            # NOTE: the listing's timeout is huggingface_hub's metadata one (HF_HUB_ETAG_TIMEOUT): a Hub
            # that does not answer falls back to the cache instead of hanging the start-up.
            info = HfApi().model_info(ref.repo_id, revision=revision, files_metadata=True,
                                      timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except RevisionNotFoundError as exc:
            raise RepoNotFoundError(f"revision {revision!r} of {ref.repo_id!r} not found on the Hub") from exc
        except (OfflineModeIsEnabled, httpx2.TransportError, HfHubHTTPError) as exc:
            return cls._from_cache(ref, revision, storage, exc)
        if not info.sha:
            raise HubError(f"the Hub at {constants.ENDPOINT} returned no commit for {ref.repo_id!r}")
        files = {s.rfilename: s.size for s in info.siblings or []}
        return cls(ref, revision, info.sha, files, storage, None)

    @classmethod
    def _from_cache(cls, ref: HubRef, revision: str, storage: Path, error: Exception) -> _Repo:
        commit = revision if is_commit_hash(revision) else _read_ref(storage, revision)
        snapshot = storage / "snapshots" / commit if commit else None
        if snapshot is None or not snapshot.is_dir():
            raise _offline_or_http_error(ref, revision, storage.parent, error) from error
        files = {p.relative_to(snapshot).as_posix(): p.stat().st_size
                 for p in sorted(snapshot.rglob("*")) if p.is_file()}
        reason = _reason(error)
        logger.warning("using the cached %s (%s)", ref.repo_id, reason)
        return cls(ref, revision, commit or revision, files, storage, reason)

    def fetch_gguf(self, ref: HubRef, gguf_file: str | None) -> Path:
        try:
            quant = select_gguf(ref.repo_id, self.files, ref.tag, gguf_file)
        except HubError as exc:
            raise type(exc)(f"{exc}{self.cached_note}") from None
        self.fetch(quant.files)
        return self.snapshot / quant.first

    def read_index(self) -> dict[str, Any] | None:
        path = self.snapshot / SAFETENSORS_INDEX
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HubError(f"cannot read {SAFETENSORS_INDEX} of {self.ref.repo_id!r}: {exc}") from exc
        return data if isinstance(data, dict) else None

    def fetch(self, files: Iterable[str]) -> None:
        """Download each file not yet in the snapshot; then point the revision's ref at the commit."""
        wanted = list(files)
        for name in wanted:
            if (self.snapshot / name).exists():
                continue
            if self.offline_reason is not None:
                raise HubOfflineError(f"{name} of {self.ref.repo_id!r} is not in the cache and the Hub "
                                      f"cannot be used ({self.offline_reason})")
            self._download(name)
        if self.offline_reason is None and wanted and not is_commit_hash(self.revision):
            _write_ref(self.storage, self.revision, self.commit)

    def _download(self, name: str) -> None:
        terminal = sys.stderr.isatty()
        if not terminal:
            size = self.files.get(name)
            logger.info("downloading %s/%s%s", self.ref.repo_id, name,
                        f" ({_format_size(size)})" if size is not None else "")
        try:
            # NOTE: on a terminal huggingface_hub draws its own bar per file (HF_HUB_DISABLE_PROGRESS_BARS
            # still applies); elsewhere its silent bar class, and the log line above instead.
            hf_hub_download(self.ref.repo_id, name, revision=self.commit, cache_dir=str(self.storage.parent),
                            tqdm_class=None if terminal else silent_tqdm)
        except RemoteEntryNotFoundError as exc:
            raise FileNotInRepoError(f"{name} not found in {self.ref.repo_id!r} at {self.commit[:12]}") from exc
        except (RepositoryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError) as exc:
            raise _offline_or_http_error(self.ref, self.revision, self.storage.parent, exc) from exc


def _offline_or_http_error(ref: HubRef, revision: str, cache: Path, error: BaseException) -> HubError:
    """The one-line error for a repo that the Hub refused or could not serve, and that is not cached."""
    repo = ref.repo_id
    at = "" if revision == constants.DEFAULT_REVISION else f" (revision {revision})"
    if isinstance(error, GatedRepoError):
        return HubAuthError(f"{repo!r} is a gated repo: accept its terms at {constants.ENDPOINT}/{repo} and "
                            f"{_LOGIN_HINT}" + (" with a token of that account" if get_token() else ""))
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if isinstance(error, RepositoryNotFoundError) and status == 404:
            return RepoNotFoundError(f"repo {repo!r}{at} not found on the Hugging Face Hub ({constants.ENDPOINT})")
        if status in (401, 403):
            if isinstance(error, RepositoryNotFoundError):
                sent = "the token sent has no access" if get_token() else "no token was sent"
                return HubAuthError(f"repo {repo!r} not found or private ({status}: {sent}); if it is private "
                                    f"or gated, {_LOGIN_HINT}")
            return HubAuthError(f"the Hub refused the token for {repo!r} ({status}); check HF_TOKEN or run "
                                "`hf auth login`")
        return HubError(f"the Hub answered {status} for {repo!r} and it is not in the cache ({cache})")
    if isinstance(error, OfflineModeIsEnabled) or constants.is_offline_mode():
        return HubOfflineError(f"HF_HUB_OFFLINE is set and {repo!r}{at} is not in the cache ({cache}); "
                               f"unset it or run `ferry pull {repo}` with network access")
    return HubOfflineError(f"cannot reach the Hub at {constants.ENDPOINT} and {repo!r}{at} is not in the cache "
                           f"({cache}): {_reason(error)}")


def _reason(error: BaseException) -> str:
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"the Hub answered {error.response.status_code}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _read_ref(storage: Path, revision: str) -> str | None:
    try:
        return (storage / "refs" / revision).read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """``refs/<revision>`` holds the commit, as huggingface_hub's cache layout has it: the offline
    look-up reads it. Written atomically, and only when it changes."""
    if _read_ref(storage, revision) == commit:
        return
    path = storage / "refs" / revision
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(commit, encoding="ascii")
    os.replace(tmp, path)


def _format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
