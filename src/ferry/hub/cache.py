"""The Hub models in the cache: list them with their size and GGUF quants, remove one (or one quant)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound
from huggingface_hub.utils import CachedFileInfo, CachedRepoInfo, HFCacheInfo

from ferry.hub.download import cache_dir
from ferry.hub.errors import HubError, NotCachedError
from ferry.hub.files import gguf_quants, select_gguf
from ferry.hub.refs import parse_ref


@dataclass(frozen=True)
class CachedQuant:
    label: str  # "Q4_K_M"
    files: tuple[str, ...]  # repo paths, first shard first
    size_bytes: int


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_bytes: int  # on disk, every revision
    path: Path  # <cache>/models--org--name
    revisions: tuple[str, ...]  # cached commits
    quants: tuple[CachedQuant, ...]  # GGUF repos: each cached quant; empty for safetensors repos


@dataclass(frozen=True)
class Removed:
    repo_id: str
    freed_bytes: int
    what: str  # "the whole repo" or the quant's files


def list_cached(download_dir: str | None = None) -> list[CachedModel]:
    """Every cached model repo, by repo id."""
    info = _scan(download_dir)
    if info is None:
        return []
    return sorted((_describe(repo) for repo in info.repos if repo.repo_type == "model"),
                  key=lambda m: m.repo_id.lower())


def remove(model: str, download_dir: str | None = None) -> Removed:
    """Delete a cached repo (every revision), or with ``repo:QUANT`` only that quant's files."""
    ref = parse_ref(model)
    info = _scan(download_dir)
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == ref.repo_id),
                None) if info is not None else None
    if info is None or repo is None:
        raise NotCachedError(f"{ref.repo_id!r} is not in the cache ({cache_dir(download_dir)})")
    if ref.tag is None:
        strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
        what = "the whole repo"
    else:
        files = _repo_files(repo)
        try:
            quant = select_gguf(ref.repo_id, files, ref.tag)
        except HubError as exc:
            raise NotCachedError(f"{exc} (in the cache)") from None
        chosen = [f for name, entries in files.items() if name in quant.files for f in entries]
        strategy = info.delete_files(*chosen)
        what = ", ".join(quant.files)
    freed = strategy.expected_freed_size
    strategy.execute()
    return Removed(ref.repo_id, freed, what)


def _scan(download_dir: str | None) -> HFCacheInfo | None:
    root = cache_dir(download_dir)
    if not root.is_dir():
        return None
    try:
        return scan_cache_dir(root)
    except CacheNotFound:
        return None


def _repo_files(repo: CachedRepoInfo) -> dict[str, list[CachedFileInfo]]:
    """Repo path -> its cached entries (one per revision holding it)."""
    files: dict[str, list[CachedFileInfo]] = {}
    for revision in repo.revisions:
        for f in revision.files:
            name = PurePosixPath(f.file_path.relative_to(revision.snapshot_path).as_posix()).as_posix()
            files.setdefault(name, []).append(f)
    return files


def _describe(repo: CachedRepoInfo) -> CachedModel:
    files = _repo_files(repo)
    quants = []
    for q in gguf_quants(files):
        blobs = {f.blob_path: f.size_on_disk for name in q.files for f in files[name]}
        quants.append(CachedQuant(q.label, q.files, sum(blobs.values())))
    return CachedModel(repo.repo_id, repo.size_on_disk, repo.repo_path,
                       tuple(sorted(r.commit_hash for r in repo.revisions)), tuple(quants))
