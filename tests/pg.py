"""PostgreSQL for the tests: the machine's server on 127.0.0.1:5432 if it answers, else a throwaway one.

``ThrowawayPostgres`` runs a private cluster from the installed binaries
(/usr/lib/postgresql/*/bin) on 127.0.0.1 and a free port; a soak test can
stop it (fast or immediate, i.e. a crash) and restart it on the same port.

Fixtures (registered by conftest): ``pg_url`` (session) is a fresh database
``glidein_store_<hex>``, dropped at the end; ``pg_state_url`` (per test) is
an empty schema in it, as a state store URL. Where no server can be had they
skip, saying why, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off  # a killed server keeps every commit (the OS has it); only a machine crash would not
full_page_writes = off
max_connections = 200
"""


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """A private PostgreSQL cluster in ``base_dir`` (trust auth, user postgres, no unix socket).

    PostgreSQL refuses to run as root: as root, the cluster runs as the
    ``postgres`` system user, which must be able to reach ``base_dir`` (a
    directory under /tmp from tempfile.mkdtemp is; pytest's tmp_path is not).
    """

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None) -> None:
        self.base = Path(base_dir)
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = port
        self._fixed_port = port is not None
        self.bin = binaries()
        self.running = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        if self.bin is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        cmd = [str(self.bin / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, tool: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
        return out

    def _initdb(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.base)]).returncode:
                raise RuntimeError(f"{self.base}: not writable by the postgres user (a parent is closed to it)")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(SETTINGS)

    def start(self) -> ThrowawayPostgres:
        """initdb if needed, then start on 127.0.0.1 and wait until it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(5):
            self.port = self.port if self._fixed_port or (self.port and attempt == 0) else free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120",
                          "-o", f"-p {self.port}", "start")
                break
            except RuntimeError:
                if self._fixed_port or "could not bind" not in self._log_tail():
                    raise RuntimeError(f"PostgreSQL did not start: {self._log_tail()}") from None
        self.running = True
        deadline = time.monotonic() + 120
        while not answers(self.url()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} does not answer: {self._log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown; ``immediate``: no checkpoint, as a crash (recovery on the next start)."""
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"stop mode {mode!r}")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (if running) and start again on the same port."""
        if self.running:
            self.stop(mode)
        self._fixed_port = True
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        admin(self.url(), f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-1500:]
        except OSError:
            return "(no log)"

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


START_LINE = """
import os, sys, time
from pathlib import Path
*ARGS, _go, _ready, _out = sys.argv[1:]

def start_line():
    Path(_ready).touch()
    while not Path(_go).exists():
        time.sleep(0.002)

def finish(result: str):
    Path(_out).write_text(result)
    os._exit(0)  # skip interpreter teardown (Airflow's exit hooks): the result is written
"""


def run_at_once(tmp_path: Path, script: str, args: list[list[str]]) -> list[str]:
    """Run one process per argument list; each does its setup, calls ``start_line()`` and waits there until
    all have arrived, then races, and reports with ``finish(result)``. Returns the results in order."""
    from tests.helpers import REPO

    go = tmp_path / "go"
    paths = [(tmp_path / f"ready{i}", tmp_path / f"out{i}") for i in range(len(args))]
    procs = [subprocess.Popen([sys.executable, "-c", START_LINE + script, *a, str(go), str(ready), str(out)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
             for a, (ready, out) in zip(args, paths)]
    deadline = time.monotonic() + 300
    while not all(ready.exists() for ready, _ in paths):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-2000:] for e in errs]
    return [out.read_text() for _, out in paths]


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {why}")
    pytest.skip(f"no PostgreSQL: {why}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A server's admin URL: the machine's on 127.0.0.1:5432, else a ThrowawayPostgres for the session."""
    if answers(MACHINE):
        yield MACHINE
        return
    if binaries() is None:
        _unavailable("nothing answers on 127.0.0.1:5432 and no binaries under /usr/lib/postgresql/*/bin")
    base = tempfile.mkdtemp(prefix="glidein-pg-")
    server = ThrowawayPostgres(base)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"nothing answers on 127.0.0.1:5432 and a throwaway server did not start: {exc}")
    yield server.url()
    server.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_server) -> Iterator[str]:
    """A fresh database for this session (``glidein_store_<hex>``), dropped at the end."""
    name = f"glidein_store_{uuid.uuid4().hex[:12]}"
    admin(pg_server, f'CREATE DATABASE "{name}"')
    yield with_database(pg_server, name)
    admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_state_url(pg_url) -> Iterator[str]:
    """An empty state store on PostgreSQL: a schema of its own in the session's database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin(pg_url, f'CREATE SCHEMA "{schema}"')
    yield f"{pg_url}?options=-csearch_path%3D{schema}"
    admin(pg_url, f'DROP SCHEMA "{schema}" CASCADE')
