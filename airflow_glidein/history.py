"""Pilot and demand history for the Pilots page's charts, kept in the state store.

One narrow table, ``glidein_history``: each factory report adds its pilot
counts per (entry, frontend, state) and each published frontend request its
idle jobs, level and max running per entry, with a marker row saying a
sample was taken (a missing row then means zero, so only non-zero counts
are written). Totals (entry or frontend ``*``) are written beside them, so a
chart reads only its own series' rows through the (kind, entry, frontend, t)
index, never a whole window of every entry. Samples older than ``RAW_SECONDS`` are rolled up into hourly
rows holding *sums*, and the hour's marker the number of samples summed,
so a mean over any bucket is Σ values / Σ markers whatever mix of raw and
hourly rows it holds. Rows past the horizon (``[glidein] history_days``,
default 30) are deleted. glideinWMS's monitoring keeps the same shape in
RRD files: fine recent data, coarser older data, a fixed horizon.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Column, Float, Index, Integer, String, Table, cast, delete, func, insert, literal, select
from sqlalchemy.exc import SQLAlchemyError

from airflow_glidein import state
from airflow_glidein.state import METADATA, StateStore

HISTORY = Table(
    "glidein_history",
    METADATA,
    Column("t", Float, nullable=False),  # epoch seconds: the sample, or the start of its hour (rolled up)
    Column("step", Integer, nullable=False, default=0),  # 0: one sample; 3600: an hour's sum
    Column("kind", String(16), nullable=False),  # pilots | idle_jobs | level | max_running | *_sample markers
    Column("entry", String(64), nullable=False, default=""),
    Column("frontend", String(160), nullable=False, default=""),  # frontend, or burst-<id>
    Column("state", String(32), nullable=False, default=""),
    Column("value", Float, nullable=False),
    Index("ix_glidein_history_series", "kind", "entry", "frontend", "t", "state", "value"),  # covers the charts
    Index("ix_glidein_history_step_t", "step", "t"),
)

log = logging.getLogger(__name__)
FACTORY_SAMPLE, FRONTEND_SAMPLE = "factory_sample", "frontend_sample"
ALL = "*"  # the entry or frontend of a total (our names never hold a *)
REQUEST_KINDS = ("idle_jobs", "level", "max_running")
RAW_SECONDS = 2 * 86400  # samples kept as taken; older ones become hourly sums
HOUR = 3600
DEFAULT_DAYS = 30


def configured_days() -> float:
    """``[glidein] history_days``: how long the charts' history is kept."""
    try:
        from airflow.sdk import conf

        return conf.getfloat("glidein", "history_days", fallback=DEFAULT_DAYS)
    except Exception:  # no Airflow configuration (CLI, tests of the engine)
        return DEFAULT_DAYS


def _row(now: float, kind: str, entry: str, frontend: str, state: str, value: float) -> dict[str, Any]:
    return {"t": now, "step": 0, "kind": kind, "entry": entry, "frontend": frontend, "state": state, "value": value}


def record_factory(counts: Mapping[str, Mapping[str, Mapping[str, int]]], now: float,
                   store: StateStore | None = None, days: float | None = None) -> bool:
    """One factory report (``pilots.counts``), then prune past ``days`` (default ``[glidein] history_days``)."""
    return _record(lambda: factory_rows(counts, now), store,
                   lambda st: prune(st, now, configured_days() if days is None else days))


def record_request(frontend: str, request: Mapping[str, Any], now: float, store: StateStore | None = None) -> bool:
    """One published frontend request."""
    return _record(lambda: request_rows(frontend, request, now), store)


def _record(rows: Callable[[], list[dict[str, Any]]], store: StateStore | None,
            then: Callable[[StateStore], None] | None = None) -> bool:
    """Charts are a view: a sample the store cannot take is logged and lost (False), never a failed cycle or an
    unpublished request."""
    data = rows()
    try:
        store = store or state.store()
    except Exception as exc:  # the store cannot be opened: as credential rotation, go on without it
        log.warning("History sample not recorded, the state store is unavailable: %s", exc)
        return False
    try:
        with store.begin() as conn:
            conn.execute(insert(HISTORY), data)
        if then:
            then(store)
        return True
    except SQLAlchemyError as exc:
        log.warning("History sample not recorded (the Pilots page's charts will miss it): %s", exc)
        return False


def factory_rows(counts: Mapping[str, Mapping[str, Mapping[str, int]]], now: float) -> list[dict[str, Any]]:
    """Pilots per (entry, frontend, state), and their totals per entry, per frontend and overall (ALL),
    so each chart reads only its own rows."""
    sums: dict[tuple[str, str, str], int] = defaultdict(int)
    for e, fes in counts.items():
        for fe, c in fes.items():
            for s, n in c.items():
                if s != "total" and n:
                    for key in ((e, fe), (e, ALL), (ALL, fe), (ALL, ALL)):
                        sums[(*key, s)] += n
    return [*(_row(now, "pilots", e, fe, s, n) for (e, fe, s), n in sums.items()),
            _row(now, FACTORY_SAMPLE, ALL, ALL, "", 1)]


def request_rows(frontend: str, request: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
    """Idle jobs, level and max running per entry, and over the frontend's entries (ALL)."""
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for entry, plan in (request.get("entries") or {}).items():
        values = {"idle_jobs": (plan.get("why") or {}).get("idle_jobs", 0), "level": plan.get("idle", 0),
                  "max_running": plan.get("max_running", 0)}
        for kind, v in values.items():
            if isinstance(v, (int, float)) and v:  # a burst has no idle jobs ("-")
                sums[(kind, entry)] += v
                sums[(kind, ALL)] += v
    return [*(_row(now, kind, e, frontend, "", v) for (kind, e), v in sums.items()),
            _row(now, FRONTEND_SAMPLE, ALL, frontend, "", 1)]


def prune(store: StateStore, now: float, days: float = DEFAULT_DAYS) -> None:
    """Roll whole hours of samples older than RAW_SECONDS into hourly sums; drop what is past the horizon."""
    cutoff = math.floor((now - RAW_SECONDS) / HOUR) * HOUR
    h = HISTORY.c
    hour = (_floor(store, h.t / HOUR) * HOUR).label("hour")
    old = (h.step == 0) & (h.t < cutoff)
    with store.begin() as conn:
        if conn.execute(select(h.t).where(old).limit(1)).first() is not None:
            rolled = (select(hour, literal(HOUR), h.kind, h.entry, h.frontend, h.state, func.sum(h.value))
                      .where(old).group_by(hour, h.kind, h.entry, h.frontend, h.state))
            conn.execute(insert(HISTORY).from_select(["t", "step", "kind", "entry", "frontend", "state", "value"],
                                                     rolled))
            conn.execute(delete(HISTORY).where(old))
        conn.execute(delete(HISTORY).where(h.t < now - days * 86400))


def _floor(store: StateStore, expr: Any) -> Any:
    """floor() of a positive number: SQLite has it only when built with its math functions."""
    return cast(expr, Integer) if store.engine.dialect.name == "sqlite" else func.floor(expr)


def series(store: StateStore, kinds: tuple[str, ...], since: float, bucket: float, entry: str | None = None,
           frontend: str | None = None, by_state: bool = False) -> dict[str, dict[float, float]]:
    """Mean value per bucket start of each series (a state, or a kind) since ``since``, for the filters.

    Pilot counts divide by the factory's samples in the bucket; frontend
    values by each frontend's own samples, then add up over frontends.
    """
    h = HISTORY.c
    b = _floor(store, h.t / bucket).label("b")
    key = h.state if by_state else h.kind
    marker = FACTORY_SAMPLE if by_state else FRONTEND_SAMPLE
    fe_col = literal("") if by_state else h.frontend  # frontends sample on their own: a mean per frontend
    q = select(b, key, fe_col, func.sum(h.value)).where(h.kind.in_(kinds), h.entry == (entry or ALL), h.t >= since)
    m = select(b, fe_col, func.sum(h.value)).where(h.kind == marker, h.entry == ALL, h.t >= since)
    if by_state:
        q = q.where(h.frontend == (frontend or ALL))
    elif frontend:
        q, m = q.where(h.frontend == frontend), m.where(h.frontend == frontend)
    q = q.group_by(b, key, *([] if by_state else [h.frontend]))
    m = m.group_by(b, *([] if by_state else [h.frontend]))
    with store.begin() as conn:
        samples = {(int(bk), fe): n for bk, fe, n in conn.execute(m)}
        out: dict[str, dict[float, float]] = {}
        for bk, name, fe, total in conn.execute(q):
            n = samples.get((int(bk), fe))
            if n:
                cell = out.setdefault(name, {})
                cell[int(bk) * bucket] = cell.get(int(bk) * bucket, 0.0) + total / n
    for name in out:  # buckets with samples but no row for this series are zeros
        for bk in {k for k, _ in samples}:
            out[name].setdefault(bk * bucket, 0.0)
    return out


def sample_times(store: StateStore, since: float, bucket: float, by_state: bool = True,
                 frontend: str | None = None) -> list[float]:
    """Bucket starts that hold at least one sample (the charts' x values): the factory's, or the frontends'
    (one frontend's with ``frontend``)."""
    h = HISTORY.c
    b = _floor(store, h.t / bucket)
    q = select(b).where(h.kind == (FACTORY_SAMPLE if by_state else FRONTEND_SAMPLE), h.entry == ALL, h.t >= since)
    if frontend and not by_state:
        q = q.where(h.frontend == frontend)
    with store.begin() as conn:
        return sorted(int(r[0]) * bucket for r in conn.execute(q.group_by(b)))
