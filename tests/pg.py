"""PostgreSQL for the tests: the machine's server on 127.0.0.1:5432 if it answers.

Fixtures (registered by conftest): ``pg_url`` (session) is a fresh database
``glidein_store_<hex>`` on that server, dropped at the end; ``pg_state_url``
(per test) is an empty schema in it, as a state store URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

MACHINE = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def answers(url: str) -> bool:
    import psycopg2

    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=5).close()
        return True
    except psycopg2.OperationalError:
        return False


def admin(url: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE / DROP DATABASE)."""
    from sqlalchemy import create_engine

    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            for sql in statements:
                conn.exec_driver_sql(sql)
    finally:
        eng.dispose()


def with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {why}")
    pytest.skip(f"no PostgreSQL: {why}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this session (``glidein_store_<hex>``), dropped at the end."""
    if not answers(MACHINE):
        _unavailable("nothing answers on 127.0.0.1:5432")
    name = f"glidein_store_{uuid.uuid4().hex[:12]}"
    admin(MACHINE, f'CREATE DATABASE "{name}"')
    yield with_database(MACHINE, name)
    admin(MACHINE, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_state_url(pg_url) -> Iterator[str]:
    """An empty state store on PostgreSQL: a schema of its own in the session's database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin(pg_url, f'CREATE SCHEMA "{schema}"')
    yield f"{pg_url}?options=-csearch_path%3D{schema}"
    admin(pg_url, f'DROP SCHEMA "{schema}" CASCADE')
