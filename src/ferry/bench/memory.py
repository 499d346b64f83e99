"""A server's memory: resident set size (RSS) from its Prometheus ``/metrics`` or from ``/proc``.

Two sources, each where it can be had:

- ``/metrics``: ``process_resident_memory_bytes``, exported by prometheus_client's process collector
  (vLLM's API server, ferry serve when it registers one). It is the serving process only: vLLM's
  engine runs in child processes this number does not include.
- ``/proc/<pid>/status`` (Linux, a server this machine started): ``VmRSS`` now and ``VmHWM`` (the
  peak), summed over the process and all its descendants (vLLM's engine processes, multiprocess
  workers).

NOTE: the summed peak is the sum of each process's own peak, an upper bound on the peak of the
sum when the processes did not peak together; with one process the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MiB = 1 << 20
RESIDENT_METRIC = "process_resident_memory_bytes"


@dataclass(frozen=True)
class MemorySample:
    """RSS of a server at one moment; ``peak_bytes`` only where ``/proc`` gave it."""

    rss_bytes: int
    peak_bytes: int | None
    source: str  # "metrics" | "proc"
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"rss_bytes": self.rss_bytes, "peak_bytes": self.peak_bytes, "source": self.source,
                "processes": self.processes}


@dataclass(frozen=True)
class PointMemory:
    """A server's memory just before and just after one load point."""

    before: MemorySample | None
    after: MemorySample | None

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None}


def _status_kib(pid: int, proc: Path) -> dict[str, int]:
    """The ``Vm*`` lines of ``/proc/<pid>/status`` in KiB; empty when the process is gone."""
    try:
        text = (proc / str(pid) / "status").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}  # NOTE: a child may exit between listing and reading; it then holds no memory
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def _parent_of(pid_dir: Path) -> int | None:
    try:
        stat = (pid_dir / "stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # NOTE: the command name (field 2) is in parentheses and may hold spaces or ')'; fields after
    # the last ')' are fixed: state, then the parent's pid.
    return int(stat.rpartition(")")[2].split()[1])


def process_tree(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid`` and every descendant that is alive now, parents first."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(sorted(children.get(p, [])))
    return out


def proc_memory(pid: int, proc: Path = Path("/proc")) -> MemorySample | None:
    """RSS and peak RSS of ``pid`` and its descendants; None when ``pid`` is not running or ``/proc``
    has no such file (not Linux)."""
    if not (proc / str(pid) / "status").is_file():
        return None
    rss = peak = n = 0
    for p in process_tree(pid, proc):
        vm = _status_kib(p, proc)
        if "VmRSS" in vm:
            rss += vm["VmRSS"] * 1024
            peak += vm.get("VmHWM", vm["VmRSS"]) * 1024
            n += 1
    return MemorySample(rss_bytes=rss, peak_bytes=peak, source="proc", processes=n) if n else None


def parse_resident_memory(text: str) -> int | None:
    """``process_resident_memory_bytes`` from a Prometheus text page, summed over its series."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(RESIDENT_METRIC) and line[len(RESIDENT_METRIC):len(RESIDENT_METRIC) + 1] in " {":
            total += float(line.rpartition(" ")[2])
            seen = True
    return int(total) if seen else None


def metrics_url(base_url: str) -> str:
    """The ``/metrics`` page of a server whose OpenAI base URL is ``base_url`` (ends in /v1)."""
    return base_url.removesuffix("/v1").rstrip("/") + "/metrics"


async def scrape_memory(client: httpx.AsyncClient, base_url: str,
                        headers: dict[str, str] | None = None) -> MemorySample | None:
    """The server's RSS from its ``/metrics``; None when it has no such page or no such series."""
    try:
        r = await client.get(metrics_url(base_url), headers=headers or {}, timeout=10)
    except httpx.HTTPError:
        return None  # NOTE: memory is optional information; a server without /metrics is normal
    if r.status_code != 200:
        return None
    rss = parse_resident_memory(r.text)
    return MemorySample(rss_bytes=rss, peak_bytes=None, source="metrics") if rss is not None else None


def format_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"
