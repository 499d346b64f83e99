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

from ferry.bench.memory import format_mib
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


# the instruction sets that decide which kernels run (ferry's, llama.cpp's, vLLM's CPU build)
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve")


def _cpu_flags() -> list[str]:
    """The CPU's vector/matrix flags of interest, from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in _ISA_FLAGS if f in have]
    return []


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
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(), "gpus": _gpus(),
        "ferry_version": __version__,
    }


def point_record(point: PointResult, workload: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """One JSON record: one URL at one load point, with the exact workload and the machine."""
    t = point.target
    return {
        "label": t.label, "url": t.base_url, "model": t.model, "endpoint": t.endpoint,
        "mode": point.load.mode, "load": point.load.to_json_value(), "load_label": point.load.label,
        **point.metrics.to_dict(), "memory": point.memory.to_dict() if point.memory else None,
        "workload": dict(workload), "machine": dict(machine),
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
    memory = format_memory_table(points)
    if memory:
        parts.append(memory)
    return "\n\n".join(parts)


def format_memory_table(points: Sequence[PointResult]) -> str:
    """Each server's RSS (MiB) before and after each point, and its peak where /proc gave one;
    empty when no point has a reading."""
    rows = []
    for p in points:
        mem = p.memory
        if mem is None or (mem.before is None and mem.after is None):
            continue
        sample = mem.after or mem.before
        assert sample is not None  # one of them is set (checked above)
        rows.append([p.target.label, p.load.label, format_mib(mem.before.rss_bytes if mem.before else None),
                     format_mib(mem.after.rss_bytes if mem.after else None), format_mib(sample.peak_bytes),
                     str(sample.processes), sample.source])
    if not rows:
        return ""
    return _table(["server", "load", "RSS before MiB", "RSS after MiB", "peak RSS MiB", "procs", "from"], rows)


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


def format_vllm_style(point: PointResult) -> str:
    """One load point as vLLM's ``benchmark_serving.py`` prints its result (same lines, same units),
    so the two can be read side by side."""
    m = point.metrics

    def line(name: str, value: float | int | None, digits: int = 2) -> str:
        shown = "-" if value is None else (str(value) if isinstance(value, int) else f"{value:.{digits}f}")
        return f"{name:<40}{shown}"

    def stats(title: str, short: str, st: Any) -> list[str]:
        return [f"{title:-^50}", line(f"Mean {short} (ms):", st.mean if st else None),
                line(f"Median {short} (ms):", st.p50 if st else None),
                line(f"P99 {short} (ms):", st.p99 if st else None)]

    head = f" Serving Benchmark Result: {point.target.label} {point.load.label} "
    return "\n".join([
        f"{head:=^50}",
        line("Successful requests:", m.ok),
        line("Failed requests:", m.failed),
        line("Benchmark duration (s):", m.duration_s),
        line("Total input tokens:", m.total_prompt_tokens),
        line("Total generated tokens:", m.total_output_tokens),
        line("Request throughput (req/s):", m.request_throughput),
        line("Output token throughput (tok/s):", m.output_throughput),
        line("Total Token throughput (tok/s):", m.total_throughput),
        *stats("Time to First Token", "TTFT", m.ttft),
        *stats("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
        *stats("Inter-token Latency", "ITL", m.itl),
        "=" * 50,
    ])
