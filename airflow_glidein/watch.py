"""When a demand watcher last started each frontend (state store).

The triggerer re-creates an asset watcher's trigger after every event, and
demand stays while pilots boot; without a memory, the watcher would start a
frontend run on every poll. It fires only after claiming the frontend here,
and a claim holds for ``min_interval`` seconds, across triggerer restarts and
replicas (the claim is one conditional UPDATE: two triggerers cannot both win).
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, String, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from airflow_glidein.state import METADATA, StateStore

WATCH = Table(
    "glidein_demand_watch",
    METADATA,
    Column("frontend", String(64), primary_key=True),
    Column("fired", Float, nullable=False),  # epoch s of the last event
    Column("idle", Integer, nullable=False, default=0),  # matching idle jobs then
)


def claim(store: StateStore, frontend: str, idle: int, now: float, min_interval: float) -> bool:
    """True if ``frontend`` was not fired within ``min_interval`` s; it then counts as fired at ``now``."""
    ins = (postgresql.insert if store.engine.dialect.name == "postgresql" else sqlite.insert)(WATCH)
    with store.begin() as conn:
        conn.execute(ins.values(frontend=frontend, fired=0.0, idle=0).on_conflict_do_nothing())
        done = conn.execute(
            update(WATCH)
            .where(WATCH.c.frontend == frontend, WATCH.c.fired <= now - min_interval)
            .values(fired=now, idle=idle)
        )
        return done.rowcount == 1


def last_fired(store: StateStore, frontend: str) -> dict | None:
    with store.begin() as conn:
        row = conn.execute(select(WATCH).where(WATCH.c.frontend == frontend)).mappings().first()
    return dict(row) if row and row["fired"] > 0 else None
