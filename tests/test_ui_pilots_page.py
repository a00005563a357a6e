"""The Pilots page's reads at scale: every page is one LIMIT query on an index, keyset pages cover each
pilot once in both directions, counts are the database's GROUP BY (no browser; tests/test_ui_browser.py
looks at the page itself)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from airflow_glidein import dashboard, state
from airflow_glidein.dashboard import View, page_query, pilot_counts, pilot_page, trouble
from bench.bench_pilots_page import fill_pilots

ENTRIES, FRONTENDS = ["site-a", "site-b", "site-c"], ["cms", "atlas"]
VIEWS = [View(), View(state="busy"), View(frontend="cms"), View(entry="site-b"), View(entry="site-c", frontend="atlas"),
         View(entry="site-a", state="idle", frontend="cms")]


@pytest.fixture
def pilots(state_store):
    store = state.store()
    rows = fill_pilots(store, 2345, ENTRIES, FRONTENDS, time.time())
    return store, rows


def expected(rows: list[dict], view: View) -> list[tuple[str, str]]:
    return sorted((r["entry"], r["id"]) for r in rows
                  if all(not getattr(view, k) or r[k] == getattr(view, k) for k in ("entry", "frontend", "state")))


@pytest.mark.parametrize("view", VIEWS)
def test_each_filter_pages_on_an_index(pilots, view):
    store, _ = pilots
    for cursor in ({}, {"after": ("site-b", "i-0")}, {"before": ("site-b", "i-0")}):
        q, _ = page_query(View(**{**vars(view), **cursor}))
        sql = str(q.compile(store.engine, compile_kwargs={"literal_binds": True}))
        with store.begin() as conn:
            plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
        assert all("INDEX" in step for step in plan), plan  # never a scan of the table
        assert not any("TEMP B-TREE" in step for step in plan), plan  # never a sort of what matched
        assert "LIMIT" in sql


@pytest.mark.parametrize("view", VIEWS)
def test_keyset_pages_cover_every_pilot_once_both_ways(pilots, view):
    store, rows = pilots
    want = expected(rows, view)
    seen, page, v = [], None, replace_size(view, 100)
    while page is None or page["next"]:
        if page:
            v = View(**{**vars(v), "after": page["next"], "before": None})
        page = pilot_page(store, v)
        seen += [(r["entry"], r["id"]) for r in page["pilots"]]
        assert len(page["pilots"]) <= 100
    assert seen == want and len(want) > 0
    back = [(r["entry"], r["id"]) for r in page["pilots"]]
    while page["prev"]:  # from the last page back to the first through "previous"
        page = pilot_page(store, View(**{**vars(v), "after": None, "before": page["prev"]}))
        back = [(r["entry"], r["id"]) for r in page["pilots"]] + back
    assert back == want


def replace_size(view: View, size: int) -> View:
    return View(**{**vars(view), "size": size})


def test_counts_and_trouble_match_the_table(pilots):
    store, rows = pilots
    counts = pilot_counts(store, View())
    assert {e: Counter(c) for e, c in counts.items()} == {
        e: Counter(r["state"] for r in rows if r["entry"] == e) for e in ENTRIES}
    assert pilot_counts(store, View(frontend="cms", state="stuck")) == {
        e: {"stuck": n} for e, n in Counter(r["entry"] for r in rows
                                            if r["frontend"] == "cms" and r["state"] == "stuck").items()}
    bad = trouble(store, View())
    assert 0 < len(bad) <= dashboard.TROUBLE_ROWS and {r["state"] for r in bad} <= set(dashboard.TROUBLE)
