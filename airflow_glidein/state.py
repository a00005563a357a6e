"""The factory's small durable state store (docs/architecture.md, "The state store").

What providers and the collector cannot tell again lives here: used
bootstrap tokens, termination attempts, entry backoff, API budget buckets.
It is one SQLAlchemy database named by an Airflow connection
(``[glidein] state_conn_id``, default ``glidein_state``): PostgreSQL in
production, so every worker and API-server replica shares it. Tasks never
touch Airflow's own metadata database.

It fails closed. The URL is resolved once per process. A connection that is
named (``state_conn_id`` set) or present (the default one) but cannot be
read, or a store that cannot be reached, raises ``StateStoreError`` naming
the connection (never a secret): the task fails, nothing falls back to
another store that would forget tokens, bindings and budgets. Only with no
connection at all is it a SQLite file in AIRFLOW_HOME (mode 0600: it holds
the generated signing key and token hashes), and only for one machine: with
a distributed executor (Celery, Kubernetes, Edge) that is refused.
``GLIDEIN_STATE_URL`` overrides all this (tests, benchmarks).

Feature modules declare their tables on ``METADATA`` (the code's queries use
them); the schema itself comes from the versioned migrations in
``airflow_glidein/migrations`` (how to add one: its docstring), which
``store()`` applies on first use in a process.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)

METADATA = MetaData()
DEFAULT_CONN_ID = "glidein_state"
VERSION_TABLE = "glidein_alembic_version"  # not alembic_version: Airflow's own DB may share the database
MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x676C6964_6D696772  # pg_advisory_xact_lock key of the schema upgrade ("glidmigr")
_lock = threading.Lock()


class StateStoreError(RuntimeError):
    """The state store cannot be used; the message names the connection and the cause, no secret."""


_resolved: tuple[str, str] | None = None  # (url, where it came from), once per process
DISTRIBUTED = ("celery", "kubernetes", "edge")  # executors whose tasks run on several machines


def distributed_executor() -> str | None:
    """The configured executor (of a hybrid list, the first) that runs tasks on several machines, if any."""
    from airflow.sdk import conf

    for name in conf.get("core", "executor", fallback="").split(","):
        if any(kind in name.lower() for kind in DISTRIBUTED):
            return name.strip()
    return None


def default_url() -> str:
    """The state store's SQLAlchemy URL (resolved once per process; ``GLIDEIN_STATE_URL`` first)."""
    return _source()[0]


def _source() -> tuple[str, str]:
    global _resolved
    url = os.environ.get("GLIDEIN_STATE_URL")
    if url:
        return url, "GLIDEIN_STATE_URL"
    with _lock:
        if _resolved is None:
            _resolved = _resolve()
        return _resolved


def _resolve() -> tuple[str, str]:
    from airflow.sdk import BaseHook, conf
    from airflow.sdk.exceptions import AirflowNotFoundException

    named = conf.get("glidein", "state_conn_id", fallback=None)
    conn_id = named or DEFAULT_CONN_ID
    where = f"connection {conn_id!r}" + (" ([glidein] state_conn_id)" if named else "")
    try:
        try:
            conn = BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            _unreadable_in(conn_id)  # the SDK reports a backend that failed as "not defined"
            raise
    except StateStoreError as exc:
        raise StateStoreError(f"glidein state store: {where} cannot be read ({exc})") from None
    except AirflowNotFoundException:
        if named:
            raise StateStoreError(f"glidein state store: {where} does not exist") from None
        executor = distributed_executor()
        if executor:
            raise StateStoreError(
                f"glidein state store: no connection {DEFAULT_CONN_ID!r} and [glidein] state_conn_id unset, but "
                f"executor {executor} runs tasks on several machines; the SQLite file in AIRFLOW_HOME serves one "
                f"machine only. Create connection {DEFAULT_CONN_ID!r} (PostgreSQL) or set [glidein] state_conn_id"
            ) from None
        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        return f"sqlite:///{os.path.join(home, 'glidein_state.db')}", "SQLite file in AIRFLOW_HOME (one machine only)"
    except Exception as exc:  # a secrets backend down, a malformed connection: never another store
        raise StateStoreError(f"glidein state store: {where} cannot be read ({type(exc).__name__})") from None
    try:
        url = conn.get_uri()
        if conn.conn_type in ("postgres", "postgresql"):
            url = url.replace("postgres://", "postgresql://", 1)
        make_url(url)
    except Exception as exc:
        raise StateStoreError(f"glidein state store: {where} is not a database URL ({type(exc).__name__})") from None
    return url, where


def _unreadable_in(conn_id: str) -> None:
    """Raise naming each secrets backend that failed to answer for ``conn_id`` (a malformed value, a
    backend down); return if every backend answered "no such connection"."""
    try:
        from airflow.sdk.execution_time.supervisor import ensure_secrets_backend_loaded

        backends = ensure_secrets_backend_loaded()
    except Exception:  # no way to ask the backends one by one here: trust the SDK's answer
        return
    failed = []
    for backend in backends:
        try:
            backend.get_connection(conn_id=conn_id)
        except Exception as exc:
            failed.append(f"{type(backend).__name__}: {type(exc).__name__}")
    if failed:
        raise StateStoreError("; ".join(failed))


def _private_file(path: str | None) -> None:
    """Create a SQLite store's file mode 0600 (it holds the signing key); tighten an older one."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    if os.stat(path).st_mode & 0o077:
        try:
            os.chmod(path, 0o600)
            log.warning("glidein state store %s was readable by others: now mode 0600", path)
        except OSError as exc:
            log.warning("glidein state store %s is readable by others and cannot be made 0600: %s", path, exc)


def engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a private file, a long busy timeout and our own BEGINs."""
    u, kwargs = make_url(url), {}
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg2")  # the driver we depend on (not psycopg 3)
    if u.get_backend_name() == "sqlite":
        _private_file(u.database)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:  # a pooled connection may have died with a database restart: test it before use, as Airflow does
        kwargs["pool_pre_ping"] = True
    eng = create_engine(u, **kwargs)
    if eng.dialect.name == "sqlite":
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
    """The newest revision: the one no other revises (read from the files; Alembic loads only to migrate)."""
    revisions, revised = set(), set()
    for path in (MIGRATIONS / "versions").glob("[0-9]*.py"):
        src = path.read_text()
        revisions.update(re.findall(r'^revision = "(\w+)"', src, re.M))
        revised.update(re.findall(r'^down_revision = "(\w+)"', src, re.M))
    (newest,) = revisions - revised
    return newest


def alembic_config(conn: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def revision(conn: Connection) -> str | None:
    """The database's schema revision (None: never migrated)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


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
            if self.engine.dialect.name == "sqlite":
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
    url, where = (url, "URL given") if url else _source()
    with _lock:
        try:
            return _store(url)
        except StateStoreError:
            raise
        except (OperationalError, ImportError) as exc:  # their messages name hosts and modules, never passwords
            cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            raise StateStoreError(f"glidein state store ({where}, {_safe(url)}) cannot be reached: {cause}") from None
        except Exception as exc:
            raise StateStoreError(f"glidein state store ({where}, {_safe(url)}) cannot be used: "
                                  f"{type(exc).__name__}") from None


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "unparsable URL"
