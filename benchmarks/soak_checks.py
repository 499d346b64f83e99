"""The soak test's verdict: what was measured (``Findings``), the checks that must pass, and the report.

Each check is a ``Check`` (name, value, ok, detail); ``run_checks`` lists them in the order the table
prints them. What each one means: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soak_traffic import CLIENT_CLOSED, KINDS, UNEXPECTED_200, Result

from ferry.bench.report import machine_info

# ---- the checks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool
    detail: str = ""


@dataclass
class Timeline:
    kill_target: str
    killed_s: float | None = None
    ready_s: float | None = None
    restart_error: str | None = None
    grace_s: float = 0.0

    def window(self, load_end_s: float) -> tuple[float, float] | None:
        """When a 502/503 or a broken stream is the kill's doing, not a fault (None: no kill happened)."""
        if self.killed_s is None:
            return None
        end = self.ready_s + self.grace_s if self.ready_s is not None else load_end_s + 1e9
        return self.killed_s, end


def in_window(r: Result, window: tuple[float, float] | None) -> bool:
    return window is not None and r.start <= window[1] and r.end >= window[0]


def fault_failures(results: list[Result], window: tuple[float, float] | None) -> list[Result]:
    """Server-side failures that are ferry's fault: any 500, and the rest outside the outage window."""
    return [r for r in results if r.server_failure and not r.capacity_shed
            and (r.outcome == "http_500" or not in_window(r, window))]


@dataclass
class Findings:
    """Everything measured after the load, for the checks and the JSON."""

    results: list[Result]
    timeline: Timeline
    load_s: float
    cloud: list[dict[str, Any]]
    # NOTE: each reading is a str (the reason) where its service could not be read
    ledger_by_status: dict[str, int] | str
    ledger_by_location: dict[str, int] | str
    ledger_cloud_leaks: int | str
    ledger_settle_s: float
    backend_idle: dict[str, float] | str
    backend_settle_s: float
    gateway_inflight: float | str
    gateway_settle_s: float
    exceptions: dict[str, list[str]]  # service label -> what its logged tracebacks raised (load and settle only)
    extra: dict[str, Any] = field(default_factory=dict)


def idle_checks(f: Findings) -> list[Check]:
    idle = f.backend_idle
    if isinstance(idle, str):
        return [Check("on-prem KV cache, running and waiting when idle", "unknown", False, idle)]
    kv, running, waiting = (idle["ferry:kv_cache_usage_perc"], idle["ferry:num_requests_running"],
                            idle["ferry:num_requests_waiting"])
    return [Check("on-prem KV cache usage when idle", f"{kv:.3f}", kv == 0, f"after {f.backend_settle_s:.1f}s"),
            Check("on-prem running + waiting when idle", f"{running:g} + {waiting:g}", running == 0 and waiting == 0)]


def ledger_checks(f: Findings) -> list[Check]:
    if isinstance(f.ledger_by_status, str):
        return [Check("ledger rows", "unknown", False, f.ledger_by_status)]
    definite = sum(r.reached == "yes" for r in f.results)
    maybe = sum(r.reached == "maybe" for r in f.results)
    rows = sum(f.ledger_by_status.values())
    pending = f.ledger_by_status.get("0", 0)
    return [Check("ledger rows pending", str(pending), pending == 0, f"after {f.ledger_settle_s:.1f}s"),
            Check("ledger rows vs requests that reached the gateway", f"{rows} rows for {definite} (+{maybe} maybe)",
                  definite <= rows <= definite + maybe,
                  "each answered request has one row; one the client left before any answer may have one")]


def ledger_status(outcome: str) -> str | None:
    """The ledger status a client outcome should have been written with (None: the client cannot tell)."""
    if outcome in ("200", UNEXPECTED_200):
        return "200"
    if outcome.startswith("http_"):
        return outcome[len("http_"):]
    return {"stream_error": "502", CLIENT_CLOSED: "499"}.get(outcome)


def status_comparison(f: Findings) -> dict[str, dict[str, int]]:
    """Per status: what the clients saw and what the ledger holds (informational: races blur 200/499)."""
    if isinstance(f.ledger_by_status, str):
        return {}
    seen = Counter(ledger_status(r.outcome) or "unknown" for r in f.results)
    statuses = sorted(set(seen) | set(f.ledger_by_status))
    return {s: {"clients": seen.get(s, 0), "ledger": f.ledger_by_status.get(s, 0)} for s in statuses}


def cloud_leaks(cloud: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests the cloud received that carried a planted PII value or a restricted tag."""
    return [c for c in cloud if c["planted"] or any(t.startswith("soak-restricted-") for t in c["tags"])]


def run_checks(f: Findings) -> list[Check]:
    window = f.timeline.window(f.load_s)
    faults = fault_failures(f.results, window)
    hung = [r for r in f.results if r.outcome == "timeout" and not in_window(r, window)]
    served_bad = [r for r in f.results if r.outcome == UNEXPECTED_200]
    leaks = cloud_leaks(f.cloud)
    inflight = f.gateway_inflight
    checks = [
        Check("ferry-fault failures (5xx, in-band errors, cut streams)", str(len(faults)), not faults,
              _examples(faults)),
        Check("hung requests (client timeout) outside the outage", str(len(hung)), not hung, _examples(hung)),
        Check("restricted/PII requests received by the cloud", str(len(leaks)), not leaks,
              "; ".join(f"{c['tags']} {c['planted']}" for c in leaks[:3])),
        Check("ledger rows of restricted/PII requests served by the cloud", str(f.ledger_cloud_leaks),
              f.ledger_cloud_leaks == 0),
        *idle_checks(f),
        Check("gateway backend slots held when idle", inflight if isinstance(inflight, str) else f"{inflight:g}",
              inflight == 0, f"after {f.gateway_settle_s:.1f}s"),
        *ledger_checks(f),
        misrecorded_499(f),
        Check("malformed/over-long requests served", str(len(served_bad)), not served_bad, _examples(served_bad)),
        Check("unhandled exceptions logged by the gateway and on-prem", str(sum(map(len, f.exceptions.values()))),
              not any(f.exceptions.values()),
              "; ".join(f"{label}: {n}x {e}" for label, raised in f.exceptions.items()
                        for e, n in Counter(raised).most_common(3))),
    ]
    if f.timeline.kill_target != "none":
        checks.append(restart_check(f.timeline, f.load_s))
    return checks


def restart_check(t: Timeline, load_s: float) -> Check:
    name = f"{t.kill_target} killed and back"
    if t.ready_s is None:
        return Check(name, "no", False, t.restart_error or "the load ended before the kill")
    if t.ready_s >= load_s:
        # NOTE: still a pass (it came back), but the idle checks then saw a replica that had no load
        return Check(name, "yes", True, f"only {t.ready_s - load_s:.0f}s after the load ended: a longer "
                                        "--duration (or an earlier --kill-at) tests the restarted replica too")
    return Check(name, "yes", True, f"back {load_s - t.ready_s:.0f}s before the load ended")


def misrecorded_499(f: Findings) -> Check:
    """Ledger rows written 499 (client left) beyond the requests whose clients did leave or cannot tell.

    NOTE: the other way round is a race, not a fault: a client that hangs up on purpose after the
    answer's last byte left the gateway has a 200 row. But a 499 row for a request whose client read
    the answer to its end (200) means the ledger recorded a served request as abandoned.
    """
    name = "completed answers recorded as client-closed (499)"
    if isinstance(f.ledger_by_status, str):
        return Check(name, "unknown", False, f.ledger_by_status)
    seen = Counter(ledger_status(r.outcome) for r in f.results)
    ledger_499 = f.ledger_by_status.get("499", 0)
    excess = max(0, ledger_499 - seen.get("499", 0) - seen.get(None, 0))
    return Check(name, str(excess), excess == 0,
                 f"ledger 499 rows {ledger_499}; clients that hung up {seen.get('499', 0)}, "
                 f"or cannot tell {seen.get(None, 0)}")


def _examples(results: list[Result], n: int = 3) -> str:
    return "; ".join(f"{r.kind}/{r.variant} {r.outcome} at {r.start:.1f}s: {(r.detail or '')[:160]}"
                     for r in results[:n])


# ---- the report ---------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), " | ".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)


def outcome_tables(f: Findings) -> str:
    window = f.timeline.window(f.load_s)
    by_kind: dict[str, Counter[str]] = {}
    for r in f.results:
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
    kind_rows = [[k, str(sum(c.values())), ", ".join(f"{o} {n}" for o, n in c.most_common())]
                 for k, c in sorted(by_kind.items())]
    totals = Counter(r.outcome for r in f.results)
    during = Counter(r.outcome for r in f.results if in_window(r, window))
    outcome_rows = [[o, str(n), str(during.get(o, 0))] for o, n in totals.most_common()]
    return "\n\n".join([table(["kind", "sent", "outcomes"], kind_rows),
                        table(["outcome", "requests", "during outage"], outcome_rows)])


def kill_line(t: Timeline) -> str:
    if t.kill_target == "none":
        return "no backend killed"
    if t.killed_s is None:
        return f"{t.kill_target} was to be killed, but the load ended first"
    back = f"{t.ready_s:.1f}s" if t.ready_s is not None else "never"
    return f"{t.kill_target} killed at {t.killed_s:.1f}s, ready again at {back} (+{t.grace_s:g}s grace)"


def summary_lines(f: Findings, args: argparse.Namespace) -> list[str]:
    n = len(f.results)
    cloud_public = sum(1 for c in f.cloud if any(tag.startswith("soak-public-") for tag in c["tags"]))
    fivexx = [r for r in f.results if r.outcome.startswith("http_5")]
    faulty = fault_failures(fivexx, f.timeline.window(f.load_s))
    rate = n / max(f.load_s, 1e-9)
    return [f"{n} requests from {args.clients} clients in {f.load_s:.0f}s ({rate:.1f} req/s); {kill_line(f.timeline)}",
            (f"5xx answers: {len(fivexx)} ({len(faulty)} of them 500s or outside the outage, "
             f"{sum(r.capacity_shed for r in fivexx)} restricted requests shed because on-prem stayed full)"),
            f"ledger rows by location: {json.dumps(f.ledger_by_location)}",
            "ledger rows by status (clients saw / ledger): " + ", ".join(
                f"{s} {c['clients']}/{c['ledger']}" for s, c in status_comparison(f).items()),
            (f"cloud received {len(f.cloud)} requests ({cloud_public} tagged public, "
             f"{sum(bool(c.get('unread')) for c in f.cloud)} cancelled before it read the body)")]


def report(f: Findings, checks: list[Check], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "schema": "ferry.soak/1", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": vars(args), "machine": machine_info(), "work_dir": str(work),
        "passed": all(c.ok for c in checks), "checks": [asdict(c) for c in checks],
        "timeline": asdict(f.timeline), "load_s": f.load_s, "requests": len(f.results),
        "outcomes": dict(Counter(r.outcome for r in f.results).most_common()),
        "by_kind": {k: dict(Counter(r.outcome for r in f.results if r.kind == k)) for k in sorted(KINDS)},
        "server_failures": [asdict(r) for r in f.results if r.server_failure][:200],
        "logged_exceptions": f.exceptions,
        "ledger": {"by_status": f.ledger_by_status, "status_comparison": status_comparison(f), "by_location": f.ledger_by_location,
                   "cloud_leaks": f.ledger_cloud_leaks,
                   "requests_reached": sum(r.reached == "yes" for r in f.results),
                   "requests_maybe": sum(r.reached == "maybe" for r in f.results)},
        "cloud": {"received": len(f.cloud), "leaks": cloud_leaks(f.cloud)[:50]},
        "backend_idle": f.backend_idle, "gateway_inflight_idle": f.gateway_inflight, **f.extra,
    }
