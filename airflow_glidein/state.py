"""The factory's small durable state store.

What providers and the collector cannot tell again lives here: used
bootstrap tokens, termination attempts, entry backoff, API budget buckets.
It is one SQLAlchemy database named by an Airflow connection
(``[glidein] state_conn_id``, default ``glidein_state``); without that
connection, a SQLite file in AIRFLOW_HOME. Postgres in production, so every
worker and API-server replica shares it. Tasks never touch Airflow's own
metadata database.

Feature modules declare their tables on ``METADATA`` (the code's queries use
them); the schema itself comes from the versioned migrations in
``airflow_glidein/migrations`` (how to add one: its docstring), which
``store()`` applies on first use in a process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

METADATA = MetaData()
DEFAULT_CONN_ID = "glidein_state"
VERSION_TABLE = "glidein_alembic_version"  # not alembic_version: Airflow's own DB may share the database
MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x676C6964_6D696772  # pg_advisory_xact_lock key of the schema upgrade ("glidmigr")
_lock = threading.Lock()


def default_url() -> str:
    """The state store's SQLAlchemy URL: from the Airflow connection, else SQLite in AIRFLOW_HOME."""
    url = os.environ.get("GLIDEIN_STATE_URL")
    if url:
        return url
    conn_id = os.environ.get("AIRFLOW__GLIDEIN__STATE_CONN_ID", DEFAULT_CONN_ID)
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        uri = conn.get_uri()
        if conn.conn_type in ("postgres", "postgresql"):
            uri = uri.replace("postgres://", "postgresql://", 1)
        return uri
    except Exception:
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        return f"sqlite:///{os.path.join(home, 'glidein_state.db')}"


def engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a long busy timeout and our own BEGINs."""
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    eng = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(eng, "connect", _sqlite_pragmas)
    return eng


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@lru_cache(maxsize=1)
def head() -> str:
    """The newest revision of the migrations."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def alembic_config(conn: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


class StateStore:
    """A SQLAlchemy engine on a store brought to the newest schema revision."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = engine(url)
        self.revision = self.upgrade()

    def upgrade(self) -> str:
        """Apply the migrations the database lacks, one process at a time; returns its revision."""
        with self.begin() as conn:  # SQLite: BEGIN IMMEDIATE holds the write lock throughout
            if self.engine.dialect.name == "postgresql":  # DDL is transactional: the lock ends with it
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            current = revision(conn)
            if current == head():
                return current
            if current is None and any(t.startswith("glidein_") for t in inspect(conn).get_table_names()):
                log.warning("glidein state store %s was made before versioned migrations: adopting its tables "
                            "as revision 0001, rows kept", self.engine.url.render_as_string(hide_password=True))
            from alembic import command

            command.upgrade(alembic_config(conn), "head")
            log.info("glidein state store migrated from %s to %s", current or "nothing", head())
            return head()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; SQLite takes its write lock at BEGIN so read-modify-write is atomic."""
        with self.engine.connect() as conn:
            if self.url.startswith("sqlite"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.begin()
            try:
                yield conn
                conn.commit()
            except BaseException:
                conn.rollback()
                raise


@lru_cache(maxsize=4)
def _store(url: str) -> StateStore:
    return StateStore(url)


def store(url: str | None = None) -> StateStore:
    """The process's store for ``url`` (default: the configured one), migrated on first use."""
    with _lock:
        return _store(url or default_url())
