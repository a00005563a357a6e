"""OpenStack's own quirks, with the real openstacksdk against tests/servers/nova.py."""

from __future__ import annotations

import base64

import pytest
from keystoneauth1.exceptions import ConnectFailure

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope

FACTORY = "cern-factory"


def entry(**options) -> Entry:
    opts = {"network": "net-private", "terminate_settle": 0, **options}
    return Entry(name="cern-batch", middleware="openstack", region="RegionOne", image="img-glidein",
                 flavor="m1.pilot", cores=4, memory_mb=8192, trust_domain="cern", auth_method="app_credential",
                 options=opts)


def spec(count: int = 3, launch: str = "r1.cms.cern-batch.0") -> LaunchSpec:
    env = signed_envelope("openstack", {"factory": FACTORY, "entry": "cern-batch", "launch_id": launch})
    return LaunchSpec(launch_id=launch, frontend="cms", count=count, image="img-glidein", userdata=env,
                      request="cycle-1")


def hook(conn_id: str = "glidein_os_test", **options):
    return pilot_hook(entry(**options), FACTORY, conn_id)


def creates(nova) -> int:
    return sum(1 for c in nova.calls if c.method == "POST" and c.path == "/compute/v2.1/servers")


def test_server_request_carries_userdata_ids_and_options(nova):
    h = hook(key_name="ops", security_groups=["glidein", "default"], config_drive=True)
    ids = h.launch(spec(count=5))["created"]
    assert creates(nova) == 1  # one multi-create (min_count = max_count = 5) for the batch
    servers = {sid: nova.servers[sid] for sid in ids}
    assert len(servers) == 5
    for s in servers.values():
        assert userdata.parse(base64.b64decode(s["user_data"]).decode())["launch_id"] == "r1.cms.cern-batch.0"
        assert s["metadata"][P.TAG_LAUNCH] == "r1.cms.cern-batch.0"
        assert s["metadata"][P.TAG_FACTORY] == FACTORY
        assert s["key_name"] == "ops" and s["config_drive"] is True
        assert s["security_groups"] == ["glidein", "default"]
        assert s["flavor"]["id"] == "f-4c8g"  # the flavor name was resolved through Nova
        assert set(s["tags"]) == {h.entry_tag, h.launch_tag("r1.cms.cern-batch.0")}
        assert s["name"].startswith(f"glidein-{FACTORY}-cern-batch-")
    # listing ours is one call, filtered by tag at the server
    before = len(nova.calls)
    assert len(h.list_pilots()) == 5
    listing = nova.calls[before:]
    assert [c.path for c in listing] == ["/compute/v2.1/servers/detail"] and "tags=" in listing[0].query


def test_a_lost_create_response_is_found_by_the_retry(nova):
    nova.lose_create_responses = 1
    with pytest.raises(ConnectFailure):
        hook().launch(spec(count=4))
    assert len(nova.servers) == 4  # Nova made them; the client never heard
    again = hook().launch(spec(count=4))  # the retried task
    assert again["created"] == [] and len(again["existing"]) == 4
    assert creates(nova) == 1 and len(nova.servers) == 4


def test_a_server_stuck_in_deleting_is_deleted_again(nova):
    ids = hook().launch(spec(count=3))["created"]
    nova.stuck(ids[:1], deletes=1)
    report = hook().terminate_verified(ids)
    assert sorted(report.gone) == sorted(ids) and report.stuck == {}
    deletes = [c for c in nova.calls if c.method == "DELETE" and c.path.endswith(ids[0])]
    assert len(deletes) == 2
    assert not [c for c in nova.calls if c.path.endswith("/action")]
    assert nova.servers == {}


def test_soft_deleted_servers_are_force_deleted(nova):
    nova.soft_delete = True  # deferred delete: DELETE leaves SOFT_DELETED servers that still hold quota
    ids = hook().launch(spec(count=3))["created"]
    report = hook().terminate_verified(ids)
    assert sorted(report.gone) == sorted(ids) and report.stuck == {}
    assert report.steps == ["terminate: 3", "terminate again: 0", "force: 3"]
    assert len([c for c in nova.calls if c.path.endswith("/action")]) == 3
    assert nova.servers == {}


def test_a_server_that_stays_is_reported_never_dropped(nova):
    ids = hook().launch(spec(count=2))["created"]
    nova.stuck(ids[:1])  # forever
    report = hook().terminate_verified(ids)
    assert report.gone == ids[1:]
    assert list(report.stuck) == ids[:1]
    assert report.stuck[ids[0]].startswith(P.P_TERMINATING)
    assert "forceDelete" in report.stuck[ids[0]]
    # still ours, still listed: the next cycle sees it and tries again
    assert [i.id for i in hook().list_pilots()] == ids[:1]


def test_a_server_in_error_is_listed_as_such_and_deleted(nova):
    nova.error_next = 1
    ids = hook().launch(spec(count=2))["created"]
    listed = {i.id: i for i in hook().list_pilots()}
    errored = [i for i in listed.values() if i.state == P.P_ERROR]
    assert len(errored) == 1 and "No valid host" in errored[0].detail
    assert hook().terminate_verified(ids).gone == ids


def test_without_server_tags_the_name_filter_lists_ours(nova):
    nova.max_microversion = "2.47"  # below 2.52: no tags at create
    h = hook()
    ids = h.launch(spec(count=2))["created"]
    hook().launch(spec(count=1, launch="r1.cms.cern-batch.1"))
    assert all(nova.servers[i]["tags"] == [] for i in ids)
    before = len(nova.calls)
    assert sorted(i.id for i in h._list("r1.cms.cern-batch.0")) == sorted(ids)
    assert len(hook().list_pilots()) == 3
    assert all("name=" in c.query and "tags=" not in c.query
               for c in nova.calls[before:] if c.path.endswith("/servers/detail"))


def test_listing_pages_with_limit_and_marker(nova):
    nova.max_limit = 4
    h = hook(multi_create=False)  # one POST per server, where a cloud disallows multi-create
    h.launch(spec(count=10))
    assert creates(nova) == 10
    before = len(nova.calls)
    assert len(h.list_pilots()) == 10
    assert len(nova.calls[before:]) == 3  # 4 + 4 + 2


def test_password_auth_and_a_bad_secret(nova, monkeypatch):
    assert hook("glidein_os_password").launch(spec(count=1))["created"]
    bad = nova.connection_json("application_credential").replace("app-cred-secret", "wrong-secret")
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_OS_BAD", bad)
    ok, msg = hook("glidein_os_bad").test_connection()
    assert not ok and "401" in msg and "wrong-secret" not in msg
    assert hook("glidein_os_test").test_connection()[0]


def test_throttled_requests_back_off_and_succeed(nova, sim_clock):
    nova.clock = sim_clock
    nova.throttle.set(6, 60)  # the cloud allows 6 calls a minute; our budget is the default 500 / 5 min
    h = hook()
    ids = h.launch(spec(count=3))["created"]
    assert len(ids) == 3
    report = h.terminate_verified(ids)
    assert report.stuck == {} and nova.servers == {}
    assert nova.throttle.refused > 0  # it did throttle us ...
    statuses = [c.status for c in nova.calls]
    assert not any(a == b == 429 for a, b in zip(statuses, statuses[1:]))  # ... and we waited as asked
    assert sim_clock.slept >= 60


def logins(nova) -> int:
    return sum(1 for c in nova.calls if c.method == "POST" and c.path == "/identity/v3/auth/tokens")


def test_hooks_of_one_endpoint_share_a_login_and_a_rotated_secret_logs_in_again(nova, monkeypatch):
    """A factory task makes a hook per entry and batch: each one logging in anew would spend the
    endpoint's API budget on Keystone tokens and version discovery."""
    hook().launch(spec(count=1))
    first = len(nova.calls)
    assert logins(nova) == 1
    for n in range(3):
        hook().launch(spec(count=1, launch=f"r1.cms.cern-batch.{n + 1}"))
    assert logins(nova) == 1
    # per launch: the lookup of its launch id, the create and the listing that confirms it; no login,
    # no version discovery, no flavor lookup again
    assert len(nova.calls) - first == 3 * 3
    # the connection's secret is rotated: a new client logs in with the new secret
    rotated = nova.connection_json("application_credential").replace("app-cred-secret", "app-cred-secret-2")
    monkeypatch.setitem(nova.app_credentials, "app-cred-id", "app-cred-secret-2")
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_OS_TEST", rotated)
    hook().launch(spec(count=1, launch="r1.cms.cern-batch.9"))
    assert logins(nova) == 2
