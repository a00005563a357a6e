"""The throwaway PostgreSQL server that tests (and later soak tests) fall back on."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from sqlalchemy import create_engine, text

from tests.pg import ThrowawayPostgres, binaries


@pytest.fixture
def throwaway():
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    base = tempfile.mkdtemp(prefix="glidein-pg-")
    server = ThrowawayPostgres(base)
    yield server
    if server.running:
        server.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


def test_throwaway_server_keeps_its_data_across_a_crash_and_a_restart(throwaway):
    throwaway.start()
    url = throwaway.create_database("glidein_store_soak")
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE t (v int)"))
        conn.execute(text("INSERT INTO t VALUES (1), (2)"))
    eng.dispose()
    port = throwaway.port
    throwaway.restart("immediate")  # a crash: recovery on start
    assert throwaway.port == port and throwaway.url("glidein_store_soak") == url
    eng = create_engine(url)
    with eng.begin() as conn:
        assert conn.execute(text("SELECT sum(v) FROM t")).scalar_one() == 3
    eng.dispose()
    throwaway.stop("fast")
    with pytest.raises(Exception):
        create_engine(url).connect()
