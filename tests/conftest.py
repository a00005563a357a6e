"""Test session setup: a throwaway AIRFLOW_HOME with SQLite, moto's EC2 server on 127.0.0.1 (and behind
the EC2-compatible proxy of tests/servers/ec2_compat.py).

Environment must be set before Airflow is imported, so it happens at import
of this module, which pytest loads first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_HOME = tempfile.mkdtemp(prefix="glidein-airflow-home-")
os.environ.update({
    "AIRFLOW_HOME": _HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AIRFLOW__GLIDEIN__CONFIG_FILE": str(REPO / "examples" / "glidein.yaml"),
})

import httpx  # noqa: E402
import pytest  # noqa: E402

# httpx gives up after 5 s by default. On a loaded 2-core CI machine an in-process API server's first answer
# (its app's first request opens and migrates a state store) can take longer: a test's HTTP calls to the
# loopback servers wait 60 s unless they say otherwise, so no verdict depends on the machine's speed.
_client_init = httpx._client.BaseClient.__init__


def _patient_init(self, *args, timeout=httpx._config.DEFAULT_TIMEOUT_CONFIG, **kwargs):
    if timeout is httpx._config.DEFAULT_TIMEOUT_CONFIG:
        timeout = httpx.Timeout(60.0)
    _client_init(self, *args, timeout=timeout, **kwargs)


httpx._client.BaseClient.__init__ = _patient_init

from tests.helpers import MotoEC2, migrate_db  # noqa: E402
from tests.servers.ec2_compat import EC2CompatProxy  # noqa: E402
from tests.servers.common import pool_token_connection  # noqa: E402

pytest_plugins = ["tests.servers.fixtures", "tests.pg"]  # Nova/Keystone and OpenNebula servers, simulated clock; PostgreSQL


@pytest.fixture(scope="session")
def airflow_db():
    migrate_db()
    return _HOME


@pytest.fixture(scope="session")
def moto_server():
    server = MotoEC2()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_clients(monkeypatch):
    """Each test starts with no provider client kept by the process (hooks share them per process):
    the test clouds are reset between tests, a real cloud is not."""
    from airflow_glidein.hooks import base

    monkeypatch.setattr(base, "_clients", {})


@pytest.fixture(autouse=True)
def state_store(tmp_path, monkeypatch):
    """Each test its own glidein state store (pilot table, backoff, tokens, budgets)."""
    url = f"sqlite:///{tmp_path}/glidein_state.db"
    monkeypatch.setenv("GLIDEIN_STATE_URL", url)
    return url


def _aws_connections(monkeypatch, conn_json: str) -> None:
    for conn_id in ("glidein_aws_demo", "glidein_aws_test", "glidein_aws_other"):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", conn_json)
    pool_token_connection(monkeypatch)


@pytest.fixture
def ec2(moto_server, monkeypatch):
    """A clean moto EC2 and the Airflow connections that point at it."""
    moto_server.reset()
    _aws_connections(monkeypatch, moto_server.connection_json())
    return moto_server


@pytest.fixture(scope="session")
def ec2_compat_server(moto_server):
    proxy = EC2CompatProxy(moto_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def ec2_compat(ec2_compat_server, monkeypatch):
    """Instead of ``ec2``: the same clean moto and connections, reached through the EC2-compatible proxy.

    Switches start at AWS's semantics without lag (ClientToken honoured); a test sets
    ``ec2_compat.set(lag=..., client_token=..., tags=..., ...)`` and may hand it ``sim_clock``.
    ``instances()`` reads what moto really holds.
    """
    ec2_compat_server.reset()
    _aws_connections(monkeypatch, ec2_compat_server.connection_json())
    return ec2_compat_server


@pytest.fixture(scope="session")
def bootstrap_server(airflow_db):
    """The real bootstrap service: Airflow's API server app (our plugin at /glidein) on 127.0.0.1."""
    from tests.pilot_helpers import BootstrapServer

    server = BootstrapServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_asset_events(request):
    """Each test starts with no glidein_requests / glidein_status events: old requests must not leak in,
    and the frontend plans from the factory's last status, which another test's (reset) moto left."""
    if "airflow_db" in request.fixturenames:
        from sqlalchemy import delete

        from airflow.models.asset import AssetEvent
        from airflow.utils.session import create_session

        with create_session() as session:
            session.execute(delete(AssetEvent))
    yield
