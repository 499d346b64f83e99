"""A fake Hugging Face Hub on loopback: the routes huggingface_hub 2.4 calls to list and download.

- ``GET /api/models/{repo}[/revision/{rev}]``: model_info (``siblings`` with sizes and LFS data);
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: small files answer 200 with ``X-Repo-Commit``, ``ETag``
  and ``Content-Length``; LFS files (``.safetensors``, ``.gguf``) answer 302 to a second server (the
  "CDN", another origin, as the real Hub's storage is) with ``X-Linked-Etag`` / ``X-Linked-Size``;
- errors carry ``X-Error-Code`` as the Hub's: ``RepoNotFound`` (404, or 401 for a private repo),
  ``GatedRepo`` (401), ``RevisionNotFound`` and ``EntryNotFound`` (404).

Every request is logged (method, path, Authorization header) so tests can assert what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # when set, requests must carry "Bearer <token>"
    gated: bool = False  # without the token: 401 GatedRepo (else 401 RepoNotFound, as a private repo)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: object) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)

    def start(self) -> FakeHub:
        self._stopped = False
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._hub, self._cdn)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def fetched(self) -> list[str]:
        """Repo paths whose bytes were sent (GET of a small file, or of an LFS blob on the CDN)."""
        names = []
        for entry in self.log:
            if entry.method != "GET":
                continue
            if entry.path.startswith("/cdn/"):
                names.append(unquote(entry.path.split("/", 3)[3]))
            elif "/resolve/" in entry.path:
                names.append(unquote(entry.path.split("/resolve/", 1)[1].split("/", 1)[1]))
        return names


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(_LFS_SUFFIXES)


def _handler(hub: FakeHub, *, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # NOTE: keep test output clean; every request is in hub.log instead

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, *, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.log.append(Logged(self.command, path, self.headers.get("Authorization")))
            if cdn:
                return self._cdn(path, body)
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                return self._info(repo_id, rev)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            self._error(404, None, "no such route")

        def _repo(self, repo_id: str, rev: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                if repo.gated:
                    self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                else:
                    self._error(401, "RepoNotFound", "Repository not found")
                return None
            if rev not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo

        def _info(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            siblings = []
            for name, data in sorted(repo.files.items()):
                entry: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)}
                if _is_lfs(name):
                    entry["lfs"] = {"size": len(data), "sha256": _sha256(data), "pointerSize": 134}
                siblings.append(entry)
            payload = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                  "siblings": siblings}).encode()
            self._send(200, {"Content-Type": "application/json"}, payload, body=True)

        def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            data = repo.files.get(name)
            if data is None:
                self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
                return
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_git_sha1(data)}"'}
            if _is_lfs(name):
                headers.update({"Location": f"{hub.cdn_url}/cdn/{_sha256(data)}/{name}",
                                "X-Linked-Etag": f'"{_sha256(data)}"', "X-Linked-Size": str(len(data))})
                self._send(302, headers, b"", body=body)
                return
            self._send(200, {**headers, "Content-Type": "application/octet-stream"}, data, body=body)

        def _cdn(self, path: str, body: bool) -> None:
            digest = path.split("/")[2]
            for repo in hub.repos.values():
                for data in repo.files.values():
                    if _sha256(data) == digest:
                        self._send(200, {"Content-Type": "application/octet-stream"}, data, body=body)
                        return
            self._error(404, None, "no such blob")

        def _error(self, status: int, code: str | None, message: str,
                   extra: dict[str, str] | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code is not None:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": message}).encode(), body=self.command != "HEAD")

        def _send(self, status: int, headers: dict[str, str], payload: bytes, *, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
