"""The factory's small durable state store (docs/architecture.md, "The state store").

What providers and the collector cannot tell again lives here: used
bootstrap tokens, termination attempts, entry backoff, API budget buckets.
It is one SQLAlchemy database named by an Airflow connection
(``[glidein] state_conn_id``, default ``glidein_state``); without that
connection, a SQLite file in AIRFLOW_HOME. Postgres in production, so every
worker and API-server replica shares it. Tasks never touch Airflow's own
metadata database.

Feature modules declare their tables on ``METADATA``; ``store()`` creates any
that are missing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Connection, Engine

METADATA = MetaData()
DEFAULT_CONN_ID = "glidein_state"
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


class StateStore:
    """A SQLAlchemy engine with the glidein tables created."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._tables = 0
        self.ensure_tables()

    def ensure_tables(self) -> None:
        """Create tables declared since the last call (feature modules load lazily)."""
        if len(METADATA.tables) != self._tables:
            METADATA.create_all(self.engine)
            self._tables = len(METADATA.tables)

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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@lru_cache(maxsize=4)
def _store(url: str) -> StateStore:
    return StateStore(url)


def store(url: str | None = None) -> StateStore:
    """The process's store for ``url`` (default: the configured one)."""
    with _lock:
        st = _store(url or default_url())
        st.ensure_tables()
        return st
