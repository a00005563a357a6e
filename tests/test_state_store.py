"""The state store's versioned schema: old stores adopted with their rows, every store at head, one
migration at a time, and the migrations equal to the tables the code declares."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, inspect, select, text

from airflow_glidein import state
from tests.helpers import REPO
from tests.pg import run_at_once

# The schema METADATA.create_all made before migrations (SQLite), frozen here. glidein_demand_watch is
# missing on purpose: create_all made a table only once its module was used.
OLD_DDL = """
CREATE TABLE glidein_api_tokens (id INTEGER NOT NULL, endpoint VARCHAR(255) NOT NULL, at FLOAT NOT NULL,
    PRIMARY KEY (id));
CREATE INDEX ix_glidein_api_tokens_endpoint_at ON glidein_api_tokens (endpoint, at);
CREATE TABLE glidein_credential_rotation (frontend VARCHAR(64) NOT NULL, entry VARCHAR(64) NOT NULL,
    purpose VARCHAR(16) NOT NULL, credential VARCHAR(64) NOT NULL, cycle VARCHAR(250) NOT NULL,
    PRIMARY KEY (frontend, entry, purpose));
CREATE TABLE glidein_entry_health (entry VARCHAR(64) NOT NULL, failures INTEGER NOT NULL, until FLOAT NOT NULL,
    reason TEXT, updated FLOAT NOT NULL, PRIMARY KEY (entry));
CREATE TABLE glidein_keys (name VARCHAR(64) NOT NULL, secret TEXT NOT NULL, created FLOAT NOT NULL,
    PRIMARY KEY (name));
CREATE TABLE glidein_launches (launch_id VARCHAR(255) NOT NULL, factory VARCHAR(64) NOT NULL,
    entry VARCHAR(64) NOT NULL, frontend VARCHAR(64) NOT NULL, count INTEGER NOT NULL,
    provision_conn VARCHAR(255) NOT NULL, pilot_credential VARCHAR(64), start_expr TEXT NOT NULL,
    policy TEXT NOT NULL, created FLOAT NOT NULL, PRIMARY KEY (launch_id));
CREATE TABLE glidein_pilot_bindings (entry VARCHAR(64) NOT NULL, pilot_id VARCHAR(255) NOT NULL,
    launch_id VARCHAR(255) NOT NULL, bound FLOAT NOT NULL, PRIMARY KEY (entry, pilot_id));
CREATE INDEX ix_glidein_pilot_bindings_launch_id ON glidein_pilot_bindings (launch_id);
CREATE TABLE glidein_pilots (id VARCHAR(128) NOT NULL, entry VARCHAR(64) NOT NULL, frontend VARCHAR(64),
    burst VARCHAR(128), launch VARCHAR(256), request VARCHAR(256), factory_run VARCHAR(256),
    launched FLOAT NOT NULL, state VARCHAR(32) NOT NULL, provider_state VARCHAR(32), conn VARCHAR(256),
    detail TEXT, startd TEXT, policy TEXT, memory TEXT NOT NULL, updated FLOAT NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_glidein_pilots_entry ON glidein_pilots (entry);
CREATE TABLE glidein_tokens (token_hash VARCHAR(64) NOT NULL, kind VARCHAR(16) NOT NULL,
    launch_id VARCHAR(255) NOT NULL, pilot_id VARCHAR(255), expires FLOAT NOT NULL, PRIMARY KEY (token_hash));
CREATE INDEX ix_glidein_tokens_launch_id ON glidein_tokens (launch_id);
INSERT INTO glidein_pilots VALUES ('17', 'one-a', 'cms', NULL, 'L1', 'r1', 'f1', 100.0, 'busy', 'running',
    'conn_a', '', NULL, NULL, '{"retire_sent": 5}', 200.0);
INSERT INTO glidein_pilots VALUES ('18', 'one-a', 'cms', NULL, 'L1', 'r1', 'f1', 100.0, 'idle', 'running',
    'conn_a', '', NULL, NULL, '{}', 200.0);
INSERT INTO glidein_keys VALUES ('signing', 'seed-bytes', 50.0);
INSERT INTO glidein_tokens VALUES ('abc123', 'bootstrap', 'L1', NULL, 999.0);
INSERT INTO glidein_api_tokens (endpoint, at) VALUES ('https://one-a/RPC2', 150.0);
INSERT INTO glidein_entry_health VALUES ('one-a', 2, 400.0, 'quota', 300.0);
"""


def _old_store(path: Path) -> str:
    db = sqlite3.connect(path)
    db.executescript(OLD_DDL)
    db.close()
    return f"sqlite:///{path}"


def _pilot(pid: str, entry: str) -> dict:
    return {"id": pid, "entry": entry, "frontend": "cms", "launch": "L2", "launched": 1.0, "state": "booting",
            "memory": {}, "updated": 1.0}


def test_a_store_made_before_migrations_is_adopted_with_its_rows(tmp_path):
    from airflow_glidein import pilotdb
    from airflow_glidein.bootstrap import keys as bkeys, tokens

    url = _old_store(tmp_path / "old.db")
    st = state.StateStore(url)
    assert st.revision == state.head() == "0002"
    rows = pilotdb.load_pilots(st)
    assert sorted(rows) == ["17", "18"] and rows["17"]["memory"] == {"retire_sent": 5}
    assert pilotdb.load_health(st)["one-a"]["reason"] == "quota"
    with st.begin() as conn:
        assert conn.execute(select(bkeys.keys.c.secret)).scalar_one() == "seed-bytes"
        assert conn.execute(select(tokens.tokens.c.launch_id)).scalar_one() == "L1"
        assert "glidein_demand_watch" in inspect(conn).get_table_names()  # the table it never had
    # 0002: the key is (entry, id): another endpoint's pilot 17 is a row of its own
    pilotdb.save_pilots(st, [_pilot("17", "two-b")])
    with st.begin() as conn:
        assert sorted(conn.execute(select(pilotdb.PILOTS.c.entry).where(pilotdb.PILOTS.c.id == "17")).scalars()) \
            == ["one-a", "two-b"]
    assert state.StateStore(url).revision == "0002"  # a second process finds it at head


def schema_diff(conn, metadata) -> list[str]:
    """What the database lacks or has beyond ``metadata``, one line per difference, naming the table."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(conn, opts={
        "compare_type": True, "include_name": lambda name, kind, _p: not (kind == "table" and name == state.VERSION_TABLE)})
    out = []
    for diff in compare_metadata(ctx, metadata):
        for op in diff if isinstance(diff, list) else [diff]:
            table = next((getattr(x, "table", None) for x in op[1:] if getattr(x, "table", None) is not None), None)
            name = table.name if table is not None else getattr(op[1], "name", "") or (op[2] if len(op) > 2 else "")
            out.append(f"{op[0]} {name}: {op[1:]!r:.300}")
    insp = inspect(conn)  # Alembic does not compare primary keys
    for table in metadata.tables.values():
        if insp.has_table(table.name):
            have = insp.get_pk_constraint(table.name)["constrained_columns"]
            want = [c.name for c in table.primary_key.columns]
            if have != want:
                out.append(f"primary_key {table.name}: migrated {have}, declared {want}")
    return out


def _matches_declared(url: str) -> None:
    from airflow_glidein.migrations import declared_metadata

    metadata = declared_metadata()
    st = state.StateStore(url)
    with st.engine.connect() as conn:
        diff = schema_diff(conn, metadata)
    assert not diff, "the migrations and the tables declared on state.METADATA differ (a table or column " \
                     "without its revision?):\n" + "\n".join(diff)


def test_migrated_sqlite_schema_is_the_declared_one(tmp_path):
    _matches_declared(f"sqlite:///{tmp_path}/fresh.db")


def test_migrated_postgres_schema_is_the_declared_one(pg_state_url):
    _matches_declared(pg_state_url)


def test_a_table_declared_without_migration_is_named(tmp_path):
    from sqlalchemy import Column, Integer, MetaData, Table

    from airflow_glidein.migrations import declared_metadata

    extra = MetaData()
    for t in declared_metadata().tables.values():
        t.to_metadata(extra)
    Table("glidein_undeclared", extra, Column("id", Integer, primary_key=True))
    st = state.StateStore(f"sqlite:///{tmp_path}/fresh.db")
    with st.engine.connect() as conn:
        diff = schema_diff(conn, extra)
    assert len(diff) == 1 and diff[0].startswith("add_table glidein_undeclared"), diff


def test_an_old_postgres_store_is_adopted(pg_state_url):
    """The same adoption on PostgreSQL, where the old key has create_all's name."""
    from airflow_glidein import pilotdb

    old = create_engine(pg_state_url)
    with old.begin() as conn:
        conn.execute(text("CREATE TABLE glidein_pilots (id VARCHAR(128) NOT NULL, entry VARCHAR(64) NOT NULL, "
                          "frontend VARCHAR(64), burst VARCHAR(128), launch VARCHAR(256), request VARCHAR(256), "
                          "factory_run VARCHAR(256), launched FLOAT NOT NULL, state VARCHAR(32) NOT NULL, "
                          "provider_state VARCHAR(32), conn VARCHAR(256), detail TEXT, startd TEXT, policy TEXT, "
                          "memory TEXT NOT NULL, updated FLOAT NOT NULL, PRIMARY KEY (id))"))
        conn.execute(text("CREATE INDEX ix_glidein_pilots_entry ON glidein_pilots (entry)"))
        conn.execute(insert(pilotdb.PILOTS), [{**_pilot("5", "one-a"), "memory": "{}"}])
    old.dispose()
    st = state.StateStore(pg_state_url)
    assert st.revision == "0002"
    pilotdb.save_pilots(st, [_pilot("5", "two-b")])
    with st.begin() as conn:
        assert sorted(conn.execute(select(pilotdb.PILOTS.c.entry)).scalars()) == ["one-a", "two-b"]
    st.engine.dispose()


RACER = """
from airflow_glidein import state  # imported before the start line
start_line()
finish(state.StateStore(ARGS[0]).revision)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_starting_at_once_all_end_at_head(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path}/race.db" if backend == "sqlite" else request.getfixturevalue("pg_state_url")
    assert run_at_once(tmp_path, RACER, [[url]] * 4) == ["0002"] * 4
    eng = create_engine(url)
    with eng.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {state.VERSION_TABLE}")).scalars().all() == ["0002"]
    eng.dispose()


def test_head_is_alembics_head():
    from alembic.script import ScriptDirectory

    assert state.head() == ScriptDirectory(str(state.MIGRATIONS)).get_current_head()


def test_migrate_state_command_prints_the_revision(tmp_path):
    url = _old_store(tmp_path / "old.db")
    out = subprocess.run([sys.executable, "-m", "airflow_glidein", "migrate-state", "--url", url],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "revision 0002 (head 0002)" in out.stdout
    db = sqlite3.connect(tmp_path / "old.db")
    assert db.execute("SELECT count(*) FROM glidein_pilots").fetchone() == (2,)
