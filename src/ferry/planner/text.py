"""Small wording helpers shared by the plan's messages, tables and plots."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``plural(1, "replica")`` -> ``1 replica``; 0 or 2 -> ``0 replicas``, ``2 replicas``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
