"""pytest fixtures for the test servers (loaded from tests/conftest.py through pytest_plugins)."""

from __future__ import annotations

import pytest

from tests.servers.common import SimClock, WallClock
from tests.servers.nova import NovaServer
from tests.servers.opennebula import OneServer


@pytest.fixture(scope="session")
def nova_server():
    server = NovaServer().start()
    yield server
    server.stop()


@pytest.fixture
def nova(nova_server, monkeypatch):
    """A clean Keystone + Nova on 127.0.0.1 and the Airflow connections that point at it."""
    nova_server.reset()
    nova_server.clock = WallClock()
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_OS_TEST", nova_server.connection_json("application_credential"))
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_OS_PASSWORD", nova_server.connection_json("password"))
    return nova_server


@pytest.fixture(scope="session")
def one_server():
    server = OneServer().start()
    yield server
    server.stop()


@pytest.fixture
def one(one_server, monkeypatch):
    """A clean OpenNebula XML-RPC endpoint on 127.0.0.1 and the Airflow connection to it."""
    one_server.reset()
    one_server.clock = WallClock()
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_ONE_TEST", one_server.connection_json())
    return one_server


@pytest.fixture
def sim_clock(monkeypatch):
    """Simulated time for the budget, the hooks' backoff and termination checks (sleeping is free)."""
    from airflow_glidein import budget

    clock = SimClock()
    monkeypatch.setattr(budget, "CLOCK", clock)
    return clock
