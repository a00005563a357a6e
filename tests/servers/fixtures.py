"""pytest fixtures for the test servers (loaded from tests/conftest.py through pytest_plugins).

Besides one clean server of each kind (``nova``, ``one``), pairs of endpoints
whose ids collide, for the pilot-identity tests: ``one_pair`` (two oned, both
numbering VMs from 0), ``nova_pair`` (two Nova handing out the same server
ids) and ``schedd_pair`` (two schedds of one pool, both numbering clusters
from 1), each with its Airflow connections and the config entries and
credentials that reach it (``EndpointPair``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.servers.common import SimClock, WallClock, pool_token_connection
from tests.servers.nova import NovaServer
from tests.servers.opennebula import OneServer

PAIR_SEED = 1403  # both Nova servers of a pair draw their server ids from this seed


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


# -- two endpoints whose ids collide ------------------------------------------------------------
@dataclass
class EndpointPair:
    """Two endpoints ("a", "b") of one middleware whose ids collide.

    ``servers`` are the two servers (or schedds), ``conn_ids`` their Airflow
    connections (set for the test), ``entries`` one config entry per endpoint
    (names, endpoints, trust domains and GLIDEIN_Site ``<SITE>_A`` / ``_B``
    apart) and ``credentials`` each endpoint's provisioning credential and the
    pool's pilot token per trust domain: put them in a config's ``entries``,
    ``credentials`` and a frontend's ``entries`` / ``credentials`` lists.
    """

    middleware: str
    servers: tuple[Any, Any]
    conn_ids: tuple[str, str]
    entries: list[dict]
    credentials: list[dict]

    @property
    def entry_names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    @property
    def credential_ids(self) -> list[str]:
        return [c["id"] for c in self.credentials]


def _pair(monkeypatch, middleware: str, prefix: str, servers, conns: list[str], cred_type: str, auth: str,
          entry: dict) -> EndpointPair:
    entries, creds = [], []
    for side, conn_id in zip("ab", conns):
        name = f"{prefix}-{side}"
        entries.append({"name": name, "middleware": middleware, "endpoint": name, "trust_domain": name,
                        "auth_method": auth, "attrs": {"GLIDEIN_Site": f"{prefix.upper()}_{side.upper()}"},
                        **json.loads(json.dumps(entry).replace("{side}", side))})
        creds += [{"id": f"{name}-cms", "type": cred_type, "conn_id": conn_id, "trust_domain": name,
                   "purpose": "provision"},
                  {"id": f"pool-{name}", "type": "idtoken", "conn_id": "glidein_cms_pool_token", "trust_domain": name,
                   "purpose": "pilot"}]
    pool_token_connection(monkeypatch)
    return EndpointPair(middleware, tuple(servers), tuple(conns), entries, creds)


@pytest.fixture(scope="session")
def one_server_pair():
    servers = (OneServer().start(), OneServer().start())
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def one_pair(one_server_pair, monkeypatch) -> EndpointPair:
    """Two clean oned endpoints, both numbering VMs from 0; connections glidein_one_a / glidein_one_b."""
    conns = ["glidein_one_a", "glidein_one_b"]
    for server, conn_id in zip(one_server_pair, conns):
        server.reset()
        server.clock = WallClock()
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", server.connection_json())
    return _pair(monkeypatch, "opennebula", "one", one_server_pair, conns, "opennebula_password",
                 "username_password", {"image": "12", "flavor": "4", "cores": 4, "memory_mb": 4096,
                                       "options": {"terminate_settle": 0}})


@pytest.fixture(scope="session")
def nova_server_pair():
    servers = (NovaServer().start(), NovaServer().start())
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def nova_pair(nova_server_pair, monkeypatch) -> EndpointPair:
    """Two clean Keystone + Nova endpoints drawing server ids from one seed (the same ids in the same order);
    connections glidein_os_a / glidein_os_b (application credentials)."""
    conns = ["glidein_os_a", "glidein_os_b"]
    for server, conn_id in zip(nova_server_pair, conns):
        server.reset()
        server.clock = WallClock()
        server.ids_from(PAIR_SEED)
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", server.connection_json("application_credential"))
    return _pair(monkeypatch, "openstack", "nova", nova_server_pair, conns, "openstack_app_credential",
                 "app_credential", {"region": "RegionOne", "image": "img-glidein", "flavor": "m1.pilot", "cores": 4,
                                    "memory_mb": 8192,
                                    "options": {"network": "net-private", "terminate_settle": 0}})


@pytest.fixture
def schedd_pair(monkeypatch, tmp_path) -> EndpointPair:
    """Two schedds of one pool (the condor stand-in, installed), both numbering clusters from 1, for
    HTCondor-G entries; connections glidein_grid_a / glidein_grid_b hold a SciToken each."""
    from tests.helpers import jwt_token
    from tests.standins import condor

    pool = condor.Pool("pair-cm.test:9618")
    schedds = (pool.add_schedd("schedd-a.pair.test"), pool.add_schedd("schedd-b.pair.test"))
    pool.install(monkeypatch)
    conns = ["glidein_grid_a", "glidein_grid_b"]
    for side, conn_id in zip("ab", conns):
        token = jwt_token({"iss": f"https://ce-{side}.example.org", "sub": "glidein", "scope": "compute.create"})
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "glidein_token",
                                                                          "password": token}))
    yield _pair(monkeypatch, "htcondor_g", "grid", schedds, conns, "scitoken", "scitoken",
                {"cores": 8, "memory_mb": 16000,
                 "options": {"collector": pool.address, "schedd": "schedd-{side}.pair.test",
                             "grid_resource": "condor ce-{side}.example.org ce-{side}.example.org:9619",
                             "credential_dir": str(tmp_path / "grid-creds"), "terminate_settle": 0}})
    pool.close()
