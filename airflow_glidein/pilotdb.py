"""The pilot table and entry health, kept in the state store.

The pilot table is the factory's view after each inventory: one row per
pilot with its state and the memory the lifecycle needs (lifecycle.Memory).
Rows are rebuilt from the providers and the collector every cycle; only the
memory carries over. Entry health holds the launch/boot failure count and
the backoff deadline of each entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Column, Float, Integer, PrimaryKeyConstraint, String, Table, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from airflow_glidein.state import METADATA, StateStore

PILOTS = Table(
    "glidein_pilots",
    METADATA,
    Column("id", String(128), nullable=False),  # the provider's id: unique only within an entry's endpoint
    Column("entry", String(64), nullable=False, index=True),
    Column("frontend", String(64)),
    Column("burst", String(128)),  # the burst a pilot serves (tag), or NULL
    Column("launch", String(256)),
    Column("request", String(256)),  # the frontend run (or burst run) whose request it serves
    Column("factory_run", String(256)),  # the factory run that launched it
    Column("launched", Float, nullable=False),
    Column("state", String(32), nullable=False),
    Column("provider_state", String(32)),
    Column("conn", String(256)),
    Column("detail", Text, default=""),
    Column("startd", Text),  # compact JSON of the startd ad's few attributes, or NULL
    Column("policy", Text),  # JSON of the pilot's own policy from its tags (bursts), or NULL
    Column("memory", Text, nullable=False, default="{}"),
    Column("updated", Float, nullable=False),
    PrimaryKeyConstraint("entry", "id", name="glidein_pilots_pkey"),
)

ENTRY_HEALTH = Table(
    "glidein_entry_health",
    METADATA,
    Column("entry", String(64), primary_key=True),
    Column("failures", Integer, nullable=False, default=0),
    Column("until", Float, nullable=False, default=0.0),
    Column("reason", Text, default=""),
    Column("updated", Float, nullable=False),
)

_JSON_COLS = ("startd", "memory", "policy")


def _upsert(store: StateStore, table: Table, rows: list[dict[str, Any]], key: list[str]) -> None:
    if not rows:
        return
    dialect = store.engine.dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    stmt = ins.on_conflict_do_update(index_elements=key, set_={c: ins.excluded[c] for c in rows[0] if c not in key})
    with store.begin() as conn:
        for chunk in range(0, len(rows), 500):
            conn.execute(stmt, rows[chunk : chunk + 500])


def _encode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for col in _JSON_COLS:
        if col in out and out[col] is not None and not isinstance(out[col], str):
            out[col] = json.dumps(out[col], sort_keys=True, default=str)
    return out


def _decode(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for col in _JSON_COLS:
        if isinstance(out.get(col), str):
            out[col] = json.loads(out[col])
    return out


def save_pilots(store: StateStore, rows: Iterable[Mapping[str, Any]]) -> None:
    cols = {c.name for c in PILOTS.columns}
    _upsert(store, PILOTS, [_encode({k: v for k, v in r.items() if k in cols}) for r in rows], ["entry", "id"])


def load_pilots(store: StateStore, entries: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    q = select(PILOTS)
    if entries is not None:
        q = q.where(PILOTS.c.entry.in_(list(entries)))
    with store.begin() as conn:
        return {r["id"]: _decode(r) for r in conn.execute(q).mappings()}


def delete_pilots(store: StateStore, ids: Iterable[str]) -> None:
    ids = list(ids)
    with store.begin() as conn:
        for chunk in range(0, len(ids), 500):
            conn.execute(delete(PILOTS).where(PILOTS.c.id.in_(ids[chunk : chunk + 500])))


def forget_entries_except(store: StateStore, entries: Iterable[str]) -> None:
    """Drop rows of entries no longer configured: their pilots are no longer listed or managed."""
    with store.begin() as conn:
        conn.execute(delete(PILOTS).where(PILOTS.c.entry.not_in(list(entries))))


def update_memory(
    store: StateStore,
    updates: Mapping[str, Mapping[str, Any]],
    now: float,
    states: Mapping[str, str] | None = None,
) -> None:
    """Merge memory fields (and optionally a new state) into existing rows, e.g. after terminate calls."""
    if not updates:
        return
    current = load_pilots(store)
    rows = []
    for pid, fields in updates.items():
        row = current.get(pid)
        if row is not None:
            state = (states or {}).get(pid, row["state"])
            rows.append({**row, "memory": {**(row.get("memory") or {}), **fields}, "state": state, "updated": now})
    save_pilots(store, rows)


def load_health(store: StateStore) -> dict[str, dict[str, Any]]:
    with store.begin() as conn:
        return {r["entry"]: dict(r) for r in conn.execute(select(ENTRY_HEALTH)).mappings()}


def save_health(store: StateStore, rows: Iterable[Mapping[str, Any]]) -> None:
    _upsert(store, ENTRY_HEALTH, [dict(r) for r in rows], ["entry"])
