"""The console's ledger queries on real databases: time buckets, overflow share, filters, CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from gateway.databases import database  # noqa: F401  (fixture: SQLite, and PostgreSQL when available)
from sqlalchemy import insert

from ferry.gateway.console import queries
from ferry.gateway.db import ledger_table, make_engine

NOW = 1_800_000_000.0  # a fixed "now": the buckets' edges are exact


def row(ts: float, **kw: Any) -> dict[str, Any]:
    base = {"ts": ts, "status": 200, "key_id": "k1", "key_name": "alpha", "team": "red", "backend": "onprem-a",
            "location": "onprem", "data_class": "public", "overflow": False, "prompt_tokens": 3,
            "completion_tokens": 5, "cost_usd": 0.001, "reason": None}  # NOTE: one key set: executemany
    return {**base, **kw}


@pytest.fixture
def engine(database: str) -> Any:  # noqa: F811
    e = make_engine(database)
    rows = [
        row(NOW - 3599),  # first 75 s bucket of the last hour
        row(NOW - 3590, location="cloud", backend="cloud-a", overflow=True),
        row(NOW - 3580, location="cloud", backend="cloud-a", overflow=False, data_class="internal"),
        row(NOW - 1800, location=None, backend=None, status=403, data_class="restricted",
            reason="=HYPERLINK(\"x\")", key_name="=evil", key_id="k2", team=None),
        row(NOW - 10, status=0),  # in flight, last bucket
        row(NOW - 7200),  # outside the hour
    ]
    with e.begin() as conn:
        conn.execute(insert(ledger_table), rows)
    yield e
    e.dispose()


def test_timeline_buckets_overflow_share_and_data_classes(engine: Any) -> None:
    tl = queries.timeline(engine, "1h", now=NOW, buckets=48)
    assert tl.width == 75.0 and len(tl.labels) == 48
    assert (tl.onprem[0], tl.cloud[0], tl.refused[0], tl.overflow[0]) == (1, 2, 0, 1)
    assert tl.share[0] == pytest.approx(33.3)  # one of three routed requests overflowed
    middle = 1800 // 75  # NOW - 1800 is 1800 s after the start
    assert tl.refused[middle] == 1 and tl.share[middle] is None  # nothing routed: no share, not 0 %
    assert tl.onprem[47] == 1  # the in-flight row, in the last bucket
    assert sum(tl.onprem) + sum(tl.cloud) + sum(tl.refused) == 5  # the row 2 h ago is out
    assert tl.data_classes["public"][0] == 2 and tl.data_classes["internal"][0] == 1
    assert tl.data_classes["restricted"][middle] == 1


def test_data_class_decisions(engine: Any) -> None:
    by = {r["data_class"]: r for r in queries.data_class_decisions(engine, NOW - 3600)}
    assert (by["public"]["onprem"], by["public"]["cloud"], by["public"]["overflow"]) == (2, 1, 1)
    assert queries.overflow_share(by["public"]) == pytest.approx(33.3)
    assert by["restricted"]["refused"] == 1 and queries.overflow_share(by["restricted"]) is None


def test_ledger_filters(engine: Any) -> None:
    def ids(**params: str) -> list[float]:
        f = queries.LedgerFilter.from_query({"period": "all", **params})
        return [r["ts"] for r in queries.ledger_page(engine, f)]

    assert len(ids()) == 6
    assert ids(key="=evil") == [NOW - 1800] == ids(key="k2")  # by name or by id
    assert ids(backend="cloud-a") == [NOW - 3580, NOW - 3590]  # newest first
    assert ids(status="error") == [NOW - 1800] == ids(status="403")
    assert ids(status="pending") == [NOW - 10]
    assert len(ids(team="red", status="ok")) == 4
    assert ids(since=str(NOW - 3595), until=str(NOW - 3585)) == [NOW - 3590]
    with pytest.raises(ValueError, match="status"):
        queries.LedgerFilter.from_query({"status": "bogus"})
    with pytest.raises(ValueError, match="until"):
        queries.LedgerFilter.from_query({"until": "yesterday"})


def test_csv_has_every_matching_row_and_defuses_formulas(engine: Any) -> None:
    f = queries.LedgerFilter.from_query({"period": "all", "team": ""})
    text = "".join(queries.ledger_csv(engine, f))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6 and list(rows[0]) == list(queries.CSV_COLUMNS)
    evil = next(r for r in rows if r["key_id"] == "k2")
    assert evil["key_name"] == "'=evil" and evil["reason"].startswith("'=HYPERLINK")
    assert evil["time_utc"] == queries.iso(NOW - 1800)
