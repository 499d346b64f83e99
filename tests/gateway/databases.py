"""The databases the ledger tests run on: SQLite always, PostgreSQL when FERRY_TEST_POSTGRES_URL is set.

Each PostgreSQL test gets a schema of its own (``search_path`` in the URL, which gateway subprocesses
inherit), so tests that run at the same time, or that wipe their tables, never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from ferry.gateway.db import make_engine, normalize_url
from ferry.gateway.ledger import Ledger

SKIP_POSTGRES = pytest.mark.skipif(
    not os.environ.get("FERRY_TEST_POSTGRES_URL"),
    reason="PostgreSQL not available: set FERRY_TEST_POSTGRES_URL=postgresql://user@host:port/db")
DATABASES = ["sqlite", pytest.param("postgresql", marks=SKIP_POSTGRES)]


def ledger_rows(url: str) -> list[dict[str, Any]]:
    """Every ledger row in the database at ``url``, read through a short-lived engine."""
    engine = make_engine(url)
    try:
        return Ledger(engine, "test").rows()
    finally:
        engine.dispose()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


def postgres_url() -> Iterator[str]:
    """A URL whose tables live in a fresh schema, dropped afterwards."""
    base = os.environ["FERRY_TEST_POSTGRES_URL"]
    schema = f"ferry_test_{secrets.token_hex(4)}"
    engine = create_engine(normalize_url(base))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=DATABASES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield from postgres_url()


@pytest.fixture
def postgres() -> Iterator[str]:
    if not os.environ.get("FERRY_TEST_POSTGRES_URL"):
        pytest.skip("PostgreSQL not available: set FERRY_TEST_POSTGRES_URL=postgresql://user@host:port/db")
    yield from postgres_url()
