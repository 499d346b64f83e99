"""The log format `ferry serve` and `ferry gateway` share: text or JSON lines on stderr, probes kept out
of the INFO access log, and a periodic one-line summary.

JSON: one object per line with ``ts`` (unix seconds), ``level``, ``logger`` and ``msg``, plus a
request's fields where the access log gives them. Text: ``TIME LEVEL LOGGER: MESSAGE``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# NOTE: what load balancers, Kubernetes and Prometheus poll every few seconds: logged at DEBUG only,
# so that the INFO log shows requests, not the probes between them
PROBE_PATHS = ("/health", "/metrics")
UVICORN_ACCESS = "uvicorn.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "ferry_fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def is_probe(path: str) -> bool:
    return path.rstrip("/") in PROBE_PATHS


class ProbeFilter(logging.Filter):
    """uvicorn's access log with probe requests moved down to DEBUG (dropped unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # NOTE: uvicorn's access record: (client, method, path with query, HTTP version, status)
        path = args[2] if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) else ""
        if not is_probe(path.split("?", 1)[0]):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def configure_logging(level: str = "info", fmt: str = "text", *, uvicorn_access: bool = False) -> None:
    """Root logging: one handler on stderr, text or JSON lines. ``uvicorn_access`` keeps uvicorn's
    access log (the gateway's request log), probes filtered; `ferry serve` has its own instead."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger(UVICORN_ACCESS)
    access.disabled = not uvicorn_access
    for f in [f for f in access.filters if isinstance(f, ProbeFilter)]:
        access.removeFilter(f)
    if uvicorn_access:
        access.addFilter(ProbeFilter())
    for name in ("uvicorn", "uvicorn.error", UVICORN_ACCESS):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # NOTE: httpx logs every outbound request at INFO: the gateway's health checks and scrapes would
    # bury its own lines. Shown with --log-level debug.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.NOTSET if root.isEnabledFor(logging.DEBUG) else logging.WARNING)


async def log_every(interval: float, summary: Callable[[float], str | None], logger: logging.Logger) -> None:
    """Every ``interval`` seconds, log ``summary(seconds since the last one)`` at INFO unless it is None."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        try:
            line = summary(now - last)
        except Exception:
            # NOTE: a summary that fails (a bug, a metric not there yet) costs one line, not the loop
            logger.exception("periodic stats failed")
            line = None
        last = now
        if line:
            logger.info(line)


class IdleGate:
    """Lets an idle summary through once, then holds the repeats until something happens again, so an
    idle server does not fill its log with identical lines."""

    def __init__(self) -> None:
        self._was_idle = False

    def passes(self, idle: bool) -> bool:
        repeat = idle and self._was_idle
        self._was_idle = idle
        return not repeat
