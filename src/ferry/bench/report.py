"""Human tables and JSON records for a bench run; the machine it ran on."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from ferry.bench.runner import PointResult

SCHEMA = "ferry.bench/1"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return platform.processor() or "unknown"
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None  # NOTE: not every OS exposes these sysconf names


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # NOTE: a broken driver must not stop a benchmark; the record just lists no GPU
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """Where the load generator ran (the servers may be elsewhere)."""
    from ferry.version import __version__

    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(), "gpus": _gpus(),
        "ferry_version": __version__,
    }


def point_record(point: PointResult, workload: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """One JSON record: one URL at one load point, with the exact workload and the machine."""
    t = point.target
    return {
        "label": t.label, "url": t.base_url, "model": t.model, "endpoint": t.endpoint,
        "mode": point.load.mode, "load": point.load.to_json_value(), "load_label": point.load.label,
        **point.metrics.to_dict(), "workload": dict(workload), "machine": dict(machine),
    }


def build_report(points: Sequence[PointResult], workload: dict[str, Any], machine: dict[str, Any],
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole JSON document; ``options`` are the command-line options (secrets already removed)."""
    return {
        "schema": SCHEMA, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": dict(options or {}), "machine": machine, "workload": workload,
        "records": [point_record(p, workload, machine) for p in points],
    }


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(x: float | int | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_tables(points: Sequence[PointResult]) -> str:
    """A throughput table, then one latency table (ms) per metric; one row per URL x load point."""
    thr_header = ["server", "load", "ok", "failed", "req/s", "out tok/s", "total tok/s", "goodput", "tokens"]
    thr_rows = []
    for p in points:
        m = p.metrics
        sources = ",".join(m.token_sources) or "-"
        thr_rows.append([p.target.label, p.load.label, str(m.ok), str(m.failed), _fmt(m.request_throughput, 2),
                         _fmt(m.output_throughput), _fmt(m.total_throughput), _fmt(m.goodput, 2), sources])
    parts = [_table(thr_header, thr_rows)]
    for title, attr in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")):
        rows = []
        for p in points:
            st = getattr(p.metrics, attr)
            rows.append([p.target.label, p.load.label,
                         *(_fmt(getattr(st, k)) if st is not None else "-" for k in ("mean", "p50", "p90", "p99"))])
        parts.append(_table(["server", "load", f"{title} ms mean", "p50", "p90", "p99"], rows))
    return "\n\n".join(parts)


def format_summary(points: Sequence[PointResult]) -> str:
    """One line per load point that had failures, with each error kind, its count and an example."""
    total = sum(p.metrics.num_requests for p in points)
    failed = sum(p.metrics.failed for p in points)
    lines = [f"{total} requests, {total - failed} ok, {failed} failed"]
    for p in points:
        m = p.metrics
        for kind, n in m.errors.items():
            lines.append(f"  {p.target.label} {p.load.label}: {n} x {kind}: {m.error_examples.get(kind, '')}")
    sources = {s for p in points for s in p.metrics.token_sources}
    if "chunks" in sources:
        lines.append("  note: some servers sent no usage and no --tokenizer was given: output tokens were "
                     "counted as streamed chunks (approximate)")
    return "\n".join(lines)
