"""The Pilots page at 100,000 pilots and 30 days of history: time one page render.

Fills a state store (SQLite in a temporary folder, or with --postgres a
throwaway database on 127.0.0.1:5432) with N pilots in 20 entries and 2
frontends, and with the history the factory and the frontends would have
written over 30 days (a sample every 5 minutes, rolled up into hourly sums
past 2 days). Then renders the page (dashboard.gather + render: the counts,
the charts, the stuck pilots and one page of the table) for several views,
and prints the median of several renders of each. The read of Airflow's two
newest asset events is not timed (it does not grow with pilots).

Goal (issue 19): a page renders in under 1 s at 100,000 pilots.

    python -m bench.bench_pilots_page [--pilots 100000] [--renders 7] [--postgres]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

GOAL_SECONDS = 1.0
ENTRIES = [f"site-{i:02d}" for i in range(20)]
FRONTENDS = ["cms", "atlas"]
# share of pilots in each state
MIX = [("busy", 0.70), ("idle", 0.10), ("booting", 0.10), ("retiring", 0.05), ("requested", 0.03), ("stuck", 0.01),
       ("lost", 0.01)]


def fill_pilots(store, n: int, entries: list[str], frontends: list[str], now: float) -> list[dict]:
    """n pilots spread over entries, frontends and states, written straight into the pilot table; the rows."""
    from sqlalchemy import insert

    from airflow_glidein.pilotdb import PILOTS

    states = [s for s, share in MIX for _ in range(round(share * 100))]
    rows = []
    for i in range(n):
        entry, fe = entries[i % len(entries)], frontends[(i // len(entries)) % len(frontends)]
        st = states[(i * 7919) % len(states)]
        rows.append({"id": f"i-{i:017x}", "entry": entry, "frontend": fe, "launch": f"run-{i // 500}-{entry}",
                     "request": f"scheduled__{i // 1000}", "factory_run": f"scheduled__{i // 1000}",
                     "launched": now - (i % 86400), "state": st, "provider_state": "running",
                     "detail": "still listed after terminate" if st == "stuck" else "",
                     "memory": '{"terminate_attempts": 3}' if st == "stuck" else "{}", "updated": now})
    with store.begin() as conn:
        for k in range(0, n, 5000):
            conn.execute(insert(PILOTS), rows[k:k + 5000])
    return rows


def fill_history(store, entries: list[str], frontends: list[str], now: float, days: float = 30,
                 step: int = 300) -> None:
    """What the factory's reports and the frontends' requests would have written (history.factory_rows /
    request_rows): a sample every ``step`` seconds for the last 2 days, hourly sums before that."""
    from sqlalchemy import insert

    from airflow_glidein.history import HISTORY, HOUR, RAW_SECONDS, factory_rows, request_rows

    def wave(t: float, phase: float) -> float:  # a daily cycle, as a pool's demand has
        return 0.55 + 0.45 * math.sin(2 * math.pi * (t / 86400 + phase))

    rows: list[dict] = []
    start, raw_from = now - days * 86400, now - RAW_SECONDS
    t = start - start % HOUR
    while t < now:
        hourly = t < raw_from - raw_from % HOUR
        counts, requests = {}, {fe: {"entries": {}} for fe in frontends}
        for i, e in enumerate(entries):
            for j, fe in enumerate(frontends):
                busy = round(250 * wave(t, i / 20 + j / 3))
                counts.setdefault(e, {})[fe] = {"busy": busy, "idle": busy // 7, "booting": busy // 9, "stuck": i % 3}
                jobs = round(900 * wave(t - 3600, i / 20 + j / 3))
                requests[fe]["entries"][e] = {"idle": jobs // 8, "max_running": jobs // 2, "why": {"idle_jobs": jobs}}
        sample = factory_rows(counts, t) + [r for fe in frontends for r in request_rows(fe, requests[fe], t)]
        weight = HOUR // step if hourly else 1  # an hour of identical samples, rolled up as prune does
        rows += [{**r, "step": HOUR if hourly else 0, "value": r["value"] * weight} for r in sample]
        t += HOUR if hourly else step
    with store.begin() as conn:
        for k in range(0, len(rows), 10000):
            conn.execute(insert(HISTORY), rows[k:k + 10000])


def _config(entries: list[str], frontends: list[str]):
    from airflow_glidein.config import parse_config

    return parse_config({
        "factory": {"name": "bench", "bootstrap_url": "http://127.0.0.1/glidein"},
        "entries": [{"name": e, "middleware": "ec2", "region": "us-east-1", "image": "ami-1", "flavor": "f",
                     "trust_domain": "aws"} for e in entries],
        "frontends": [{"name": f, "demand": {"queue_file": "q.json"}, "entries": entries, "credentials": ["k", "t"]}
                      for f in frontends],
        "credentials": [{"id": "k", "type": "ec2_key_pair", "conn_id": "c", "trust_domain": "aws",
                         "purpose": "provision"},
                        {"id": "t", "type": "idtoken", "conn_id": "t", "trust_domain": "aws", "purpose": "pilot"}],
    })


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pilots", type=int, default=100_000)
    ap.add_argument("--renders", type=int, default=7)
    ap.add_argument("--postgres", action="store_true", help="a throwaway database on 127.0.0.1:5432 (user postgres)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pilots-page-")
    admin = None
    if args.postgres:
        from sqlalchemy import create_engine, text

        try:
            import psycopg2  # noqa: F401
        except ImportError:
            print("--postgres needs the psycopg2 driver (pip install psycopg2-binary)", file=sys.stderr)
            return 2

        name = f"glidein_gwms_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        os.environ["GLIDEIN_STATE_URL"] = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    else:
        os.environ["GLIDEIN_STATE_URL"] = f"sqlite:///{Path(tmp) / 'state.db'}"
    try:
        return run(args)
    finally:
        if admin is not None:
            from sqlalchemy import text

            from airflow_glidein import state

            state.store().engine.dispose()
            with admin.connect() as c:
                c.execute(text(f"DROP DATABASE IF EXISTS {name}"))


def run(args: argparse.Namespace) -> int:
    from airflow_glidein import state
    from airflow_glidein.dashboard import View, gather, render  # declares the page's indexes before the store is made

    store = state.store()
    now = time.time()
    t0 = time.perf_counter()
    fill_pilots(store, args.pilots, ENTRIES, FRONTENDS, now)
    fill_history(store, ENTRIES, FRONTENDS, now)
    print(f"state store: {store.engine.dialect.name}; filled {args.pilots:,} pilots and 30 days of history "
          f"in {time.perf_counter() - t0:.1f} s")
    cfg = _config(ENTRIES, FRONTENDS)
    deep = (ENTRIES[10], f"i-{args.pilots // 2:017x}")
    views = {
        "first page, 24h charts": View(),
        "page after pilot 50,000": View(after=deep),
        "previous page from there": View(before=deep),
        "state stuck": View(state="stuck"),
        "entry + frontend, 7d charts": View(entry=ENTRIES[3], frontend="atlas", range="7d"),
        "500 rows, 30d charts": View(size=500, range="30d"),
    }
    worst = 0.0
    print(f"{'view':32} {'median s':>9} {'min s':>7}  rows  bytes")
    for label, view in views.items():
        times = []
        for _ in range(args.renders):
            t = time.perf_counter()
            page = render(gather(cfg, store, view, now, [], {}))
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        worst = max(worst, med)
        rows = page.count("<td>i-")  # each pilot row names its id once
        print(f"{label:32} {med:9.3f} {min(times):7.3f} {rows:5d} {len(page):6d}")
    ok = worst < GOAL_SECONDS
    print(f"goal: every view renders in under {GOAL_SECONDS:g} s at {args.pilots:,} pilots (median of "
          f"{args.renders}): {'met' if ok else 'MISSED'} (slowest median {worst:.3f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
