"""The pilot table and entry health, kept in the state store.

The pilot table is the factory's view after each inventory: one row per
pilot, keyed by (entry, provider id) since provider ids collide across
endpoints, with its state and the memory the lifecycle needs
(lifecycle.Memory). Rows are rebuilt from the providers and the collector
every cycle; only the memory carries over. A launch records the ids it
created at once (state ``requested``), before any listing shows them:
listings lag, and those rows are what keeps a retry from creating them again.
Functions take and return pilot keys (``pilots.pilot_key``: "entry/id").

Entry health holds the launch/boot failure count and the backoff deadline of
each entry; the failures table, what went wrong in which factory run (the
run's report turns it red).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    delete,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from airflow_glidein import pilots as P
from airflow_glidein.state import METADATA, StateStore

PILOTS = Table(
    "glidein_pilots",
    METADATA,
    Column("id", String(128), nullable=False),  # the provider's id: unique only within its entry (the key)
    Column("entry", String(64), nullable=False, index=True),
    Column("frontend", String(64)),
    Column("burst", String(128)),  # the burst a pilot serves (tag), or NULL
    Column("launch", String(256)),
    Column("request", String(256)),  # the frontend run (or burst run) whose request it serves
    Column("factory_run", String(256)),  # the factory run that launched it
    Column("launched", Float, nullable=False),
    Column("started", Float),  # when the site started it (grid jobs queue first); NULL: not started, or a VM
    Column("alias", String(128)),  # another id the pilot may claim (an EC2 GAHP job's instance id), or NULL
    Column("state", String(32), nullable=False),
    Column("provider_state", String(32)),
    Column("conn", String(256)),
    Column("detail", Text, default=""),
    Column("startd", Text),  # compact JSON of the startd ad's few attributes, or NULL
    Column("policy", Text),  # JSON of the pilot's own policy from its tags (bursts), or NULL
    Column("memory", Text, nullable=False, default="{}"),
    Column("updated", Float, nullable=False),
    PrimaryKeyConstraint("entry", "id", name="glidein_pilots_pkey"),
    # the Pilots page filters by state or frontend and pages by (entry, id): a range scan at any depth
    Index("ix_glidein_pilots_state_entry_id", "state", "entry", "id"),
    Index("ix_glidein_pilots_frontend_entry_id", "frontend", "entry", "id"),
    # the bootstrap service finds a pilot by the alias it claims
    Index("ix_glidein_pilots_entry_alias", "entry", "alias"),
)

ENTRY_HEALTH = Table(
    "glidein_entry_health",
    METADATA,
    Column("entry", String(64), primary_key=True),
    Column("failures", Integer, nullable=False, default=0),
    Column("until", Float, nullable=False, default=0.0),
    Column("reason", Text, default=""),
    Column("updated", Float, nullable=False),
    Column("run_id", String(256)),  # the factory run that last counted a failure: a retry counts no more
)

FAILURES = Table(
    "glidein_failures",
    METADATA,
    Column("run_id", String(256), primary_key=True),
    Column("entry", String(64), primary_key=True),
    Column("call", String(64), primary_key=True),  # listing | launch | terminate | verify
    Column("message", Text, nullable=False),
    Column("at", Float, nullable=False),
)

# One row per launch id: what its last create call asked and how it ended. A call whose answer never
# came (the task died, the connection broke) may still have made instances that the listing does not
# show yet; until the entry's listing_grace has passed they count as capacity and block a re-create.
LAUNCH_CALLS = Table(
    "glidein_launch_calls",
    METADATA,
    Column("entry", String(64), primary_key=True),
    Column("launch_id", String(255), primary_key=True),
    Column("frontend", String(64)),
    Column("burst", String(128)),
    Column("expected", Integer, nullable=False),  # instances the launch has if its last call did what it asked
    Column("started", Float, nullable=False),  # the last create call
    # calling | made | unknown (it failed) | refused (made nothing) | settled (every instance was held once)
    Column("outcome", String(16), nullable=False),
)

# One row per launch marker made at the provider (an EC2 key pair per launch where tags cannot be
# trusted): written before the marker is made and before RunInstances, so a listing maps the marker
# back to the launch's tags after any crash, and the inventory deletes the marker once its instances
# are gone (markers count against provider quotas).
MARKERS = Table(
    "glidein_markers",
    METADATA,
    Column("entry", String(64), primary_key=True),
    Column("name", String(255), primary_key=True),  # the key pair's name
    Column("kind", String(32), nullable=False),  # key_pair
    Column("launch_id", String(255), nullable=False),
    Column("tags", Text, nullable=False),  # JSON: the tags the launch's instances would carry
    Column("created", Float, nullable=False),
)

# The configuration of every entry that has had pilots, as it last was: the pilots of an entry taken
# out of the configuration are still listed and drained through it (and the last connection that saw them).
ENTRY_SNAPSHOTS = Table(
    "glidein_entry_snapshots",
    METADATA,
    Column("entry", String(64), primary_key=True),
    Column("config", Text, nullable=False),  # the Entry model as JSON
    Column("updated", Float, nullable=False),  # the last cycle it was configured
)

_JSON_COLS = ("startd", "memory", "policy")


def _insert(store: StateStore, table: Table) -> Any:
    return (postgresql.insert if store.engine.dialect.name == "postgresql" else sqlite.insert)(table)


def _upsert(store: StateStore, table: Table, rows: list[dict[str, Any]], key: str | tuple[str, ...],
            update: bool = True) -> None:
    if not rows:
        return
    keys = [key] if isinstance(key, str) else list(key)
    ins = _insert(store, table)
    stmt = (ins.on_conflict_do_update(index_elements=keys, set_={c: ins.excluded[c] for c in rows[0] if c not in keys})
            if update else ins.on_conflict_do_nothing(index_elements=keys))
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


def _key(row: Mapping[str, Any]) -> str:
    return P.pilot_key(row["entry"], row["id"])


def _where_keys(keys: list[str]) -> Any:
    pairs = [P.split_key(k) for k in keys]
    return tuple_(PILOTS.c.entry, PILOTS.c.id).in_(pairs)


def save_pilots(store: StateStore, rows: Iterable[Mapping[str, Any]]) -> None:
    cols = {c.name for c in PILOTS.columns}
    _upsert(store, PILOTS, [_encode({k: v for k, v in r.items() if k in cols}) for r in rows], ("entry", "id"))


def record_created(store: StateStore, rows: Iterable[Mapping[str, Any]]) -> None:
    """Instances a launch just created, as ``requested`` rows, at once: before any listing shows them.

    A row already there (listed by an inventory in between) is left as it is.
    """
    cols = {c.name for c in PILOTS.columns}
    _upsert(store, PILOTS, [_encode({k: v for k, v in r.items() if k in cols}) for r in rows], ("entry", "id"),
            update=False)


def load_pilots(store: StateStore, entries: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{pilot key: row}, of these entries (default: every entry the table holds)."""
    q = select(PILOTS)
    if entries is not None:
        q = q.where(PILOTS.c.entry.in_(list(entries)))
    with store.begin() as conn:
        return {_key(r): _decode(r) for r in conn.execute(q).mappings()}


def launch_ids(store: StateStore, entry: str, launch_id: str) -> set[str]:
    """Provider ids the table holds for one launch (recorded at create, or listed since)."""
    with store.begin() as conn:
        return set(conn.execute(select(PILOTS.c.id).where(PILOTS.c.entry == entry,
                                                          PILOTS.c.launch == launch_id)).scalars())


def delete_pilots(store: StateStore, keys: Iterable[str]) -> None:
    keys = list(keys)
    with store.begin() as conn:
        for chunk in range(0, len(keys), 500):
            conn.execute(delete(PILOTS).where(_where_keys(keys[chunk : chunk + 500])))


def update_memory(
    store: StateStore,
    updates: Mapping[str, Mapping[str, Any]],
    now: float,
    states: Mapping[str, str] | None = None,
) -> None:
    """Merge memory fields (and optionally a new state) into existing rows (by pilot key), e.g. after
    terminate calls."""
    if not updates:
        return
    keys = list(updates)
    with store.begin() as conn:
        current = {}
        for chunk in range(0, len(keys), 500):
            q = select(PILOTS).where(_where_keys(keys[chunk : chunk + 500]))
            current.update({_key(r): _decode(r) for r in conn.execute(q).mappings()})
    rows = []
    for key, fields in updates.items():
        row = current.get(key)
        if row is not None:
            state = (states or {}).get(key, row["state"])
            rows.append({**row, "memory": {**(row.get("memory") or {}), **fields}, "state": state, "updated": now})
    save_pilots(store, rows)


class LaunchLog:
    """One launch's record in the state store: the ids it made (at once) and its create calls.

    The hook calls it around each create call (``hooks.base.PilotHook.launch``),
    so a retry, a cleared run or the next cycle knows what the launch made
    before the provider lists it.
    """

    def __init__(self, store: StateStore, entry: str, launch_id: str, now: float, row: Mapping[str, Any]) -> None:
        self.store, self.entry, self.launch_id, self.now = store, entry, launch_id, now
        self.row = dict(row)  # the pilot row fields every created instance gets (frontend, launch, conn, ...)

    def known(self) -> set[str]:
        """Ids recorded at create or listed since, for this launch."""
        return launch_ids(self.store, self.entry, self.launch_id)

    def last_call(self) -> dict[str, Any] | None:
        with self.store.begin() as conn:
            row = conn.execute(select(LAUNCH_CALLS).where(LAUNCH_CALLS.c.entry == self.entry,
                                                          LAUNCH_CALLS.c.launch_id == self.launch_id)).first()
        return dict(row._mapping) if row else None

    def calling(self, expected: int) -> None:
        """Before a create call that should bring the launch to ``expected`` instances."""
        _upsert(self.store, LAUNCH_CALLS, [{
            "entry": self.entry, "launch_id": self.launch_id, "frontend": self.row.get("frontend"),
            "burst": self.row.get("burst"), "expected": expected, "started": self.now, "outcome": "calling"}],
            ("entry", "launch_id"))

    def created(self, ids: Iterable[str], launched: float | None = None) -> None:
        record_created(self.store, [{**self.row, "entry": self.entry, "id": i, "launch": self.launch_id,
                                     "launched": launched or self.now, "state": P.REQUESTED, "memory": {},
                                     "updated": self.now} for i in ids])

    def marking(self, kind: str, name: str, tags: Mapping[str, str], now: float) -> None:
        """Before a marker is made at the provider: its launch and tags (kept if already recorded).
        ``now`` on the hook's clock, which also decides when an unused marker may go."""
        _upsert(self.store, MARKERS, [{"entry": self.entry, "name": name, "kind": kind, "launch_id": self.launch_id,
                                       "tags": json.dumps(dict(tags)), "created": now}],
                ("entry", "name"), update=False)

    def called(self, outcome: str) -> None:
        with self.store.begin() as conn:
            conn.execute(LAUNCH_CALLS.update().where(LAUNCH_CALLS.c.entry == self.entry,
                                                     LAUNCH_CALLS.c.launch_id == self.launch_id)
                         .values(outcome=outcome))


def load_markers(store: StateStore, entry: str) -> dict[str, dict[str, Any]]:
    """An entry's launch markers by name, each with its tags decoded."""
    with store.begin() as conn:
        rows = conn.execute(select(MARKERS).where(MARKERS.c.entry == entry)).mappings().all()
    return {r["name"]: {**r, "tags": json.loads(r["tags"])} for r in rows}


def drop_markers(store: StateStore, entry: str, names: Iterable[str]) -> None:
    names = list(names)
    if names:
        with store.begin() as conn:
            conn.execute(delete(MARKERS).where(MARKERS.c.entry == entry, MARKERS.c.name.in_(names)))


def unlisted_launches(store: StateStore, entries: Iterable[str], since: float) -> list[dict[str, Any]]:
    """Launches with a create call since ``since`` (within the listing grace) that may have instances
    the table does not hold yet: each with ``missing`` = expected - ids held (> 0 only). A launch whose
    instances were all held once is settled: the ones that die later are gone, not unlisted."""
    entries = list(entries)
    with store.begin() as conn:
        calls = [dict(r) for r in conn.execute(select(LAUNCH_CALLS).where(
            LAUNCH_CALLS.c.entry.in_(entries), LAUNCH_CALLS.c.started >= since,
            LAUNCH_CALLS.c.outcome.not_in(["refused", "settled"]))).mappings()]
        if not calls:
            return []
        held: dict[tuple[str, str], int] = {}
        q = select(PILOTS.c.entry, PILOTS.c.launch).where(
            tuple_(PILOTS.c.entry, PILOTS.c.launch).in_([(c["entry"], c["launch_id"]) for c in calls]))
        for entry, launch in conn.execute(q):
            held[(entry, launch)] = held.get((entry, launch), 0) + 1
    out, settled = [], []
    for c in calls:
        missing = c["expected"] - held.get((c["entry"], c["launch_id"]), 0)
        if missing > 0:
            out.append({**c, "missing": missing})
        else:
            settled.append((c["entry"], c["launch_id"]))
    if settled:  # every instance was accounted for once: those that die later are gone, not unlisted
        with store.begin() as conn:
            conn.execute(LAUNCH_CALLS.update().where(
                tuple_(LAUNCH_CALLS.c.entry, LAUNCH_CALLS.c.launch_id).in_(settled)).values(outcome="settled"))
    return out


def prune_launch_calls(store: StateStore, before: float) -> None:
    with store.begin() as conn:
        conn.execute(delete(LAUNCH_CALLS).where(LAUNCH_CALLS.c.started < before))


def record_failure(store: StateStore, run_id: str, entry: str, call: str, message: str, now: float,
                   keep: bool = False) -> None:
    """What went wrong at an entry in a factory run: a retry's failure replaces the earlier one, unless
    ``keep`` (a retry that only waits on the first failure's consequences keeps its cause on record)."""
    _upsert(store, FAILURES, [{"run_id": run_id, "entry": entry, "call": call, "message": message[:2000],
                               "at": now}], ("run_id", "entry", "call"), update=not keep)


def clear_failure(store: StateStore, run_id: str, entry: str, call: str) -> None:
    """A retry went through: that call no longer failed in this run."""
    with store.begin() as conn:
        conn.execute(delete(FAILURES).where(FAILURES.c.run_id == run_id, FAILURES.c.entry == entry,
                                            FAILURES.c.call == call))


def failures(store: StateStore, run_id: str) -> list[dict[str, Any]]:
    with store.begin() as conn:
        q = select(FAILURES).where(FAILURES.c.run_id == run_id).order_by(FAILURES.c.entry, FAILURES.c.call)
        return [dict(r) for r in conn.execute(q).mappings()]


def prune_failures(store: StateStore, before: float) -> None:
    with store.begin() as conn:
        conn.execute(delete(FAILURES).where(FAILURES.c.at < before))


def save_snapshots(store: StateStore, configs: Mapping[str, str], now: float) -> None:
    """The configured entries' settings (JSON), as of this cycle."""
    _upsert(store, ENTRY_SNAPSHOTS, [{"entry": e, "config": c, "updated": now} for e, c in configs.items()], "entry")


def load_snapshots(store: StateStore, entries: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    q = select(ENTRY_SNAPSHOTS)
    if entries is not None:
        q = q.where(ENTRY_SNAPSHOTS.c.entry.in_(list(entries)))
    with store.begin() as conn:
        return {r["entry"]: {**r, "config": json.loads(r["config"])} for r in conn.execute(q).mappings()}


def drop_snapshots(store: StateStore, entries: Iterable[str]) -> None:
    with store.begin() as conn:
        conn.execute(delete(ENTRY_SNAPSHOTS).where(ENTRY_SNAPSHOTS.c.entry.in_(list(entries))))


def stranded(store: StateStore, configured: Iterable[str]) -> dict[str, set[str]]:
    """{entry: connections} of remembered pilots at entries no longer configured."""
    with store.begin() as conn:
        q = select(PILOTS.c.entry, PILOTS.c.conn).where(PILOTS.c.entry.not_in(list(configured))).distinct()
        out: dict[str, set[str]] = {}
        for entry, c in conn.execute(q):
            out.setdefault(entry, set()).update([c] if c else [])
        return out


def load_health(store: StateStore) -> dict[str, dict[str, Any]]:
    with store.begin() as conn:
        return {r["entry"]: dict(r) for r in conn.execute(select(ENTRY_HEALTH)).mappings()}


def save_health(store: StateStore, rows: Iterable[Mapping[str, Any]]) -> None:
    _upsert(store, ENTRY_HEALTH, [dict(r) for r in rows], ["entry"])


def resolve(store: StateStore | Connection, entry: str, launch_id: str, claimed: str) -> str | None:
    """The pilot's id if the factory recorded ``claimed`` (its id, or its alias: an EC2 GAHP job's
    instance id) as made by ``launch_id`` at ``entry``; None if it did not. No provider call.

    ``store`` may be a connection of a transaction under way (the bootstrap service's exchange).
    """
    q = select(PILOTS.c.id).where(PILOTS.c.entry == entry, PILOTS.c.launch == launch_id,
                                  or_(PILOTS.c.id == claimed, PILOTS.c.alias == claimed)).limit(1)
    if isinstance(store, Connection):
        return store.execute(q).scalar()
    with store.begin() as conn:
        return conn.execute(q).scalar()
