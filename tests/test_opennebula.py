"""OpenNebula's own quirks, with the real pyone against tests/servers/opennebula.py."""

from __future__ import annotations

import base64

import pytest
import requests

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope
from tests.servers.opennebula import STATES, parse_template

FACTORY = "fnal-factory"


def entry(flavor: str = "4", image: str = "13", **options) -> Entry:
    return Entry(name="fermicloud", middleware="opennebula", image=image, flavor=flavor, cores=4, memory_mb=8192,
                 trust_domain="fnal", auth_method="username_password",
                 options={"terminate_settle": 0, **options})


def spec(count: int = 3, launch: str = "r1.nova.fermicloud.0") -> LaunchSpec:
    env = signed_envelope("opennebula", {"factory": FACTORY, "entry": "fermicloud", "launch_id": launch})
    return LaunchSpec(launch_id=launch, frontend="nova", count=count, image="13", userdata=env, request="c1")


def hook(**kwargs):
    return pilot_hook(entry(**kwargs), FACTORY, "glidein_one_test")


def actions(one, name: str) -> int:
    return sum(1 for c in one.calls if c.path == f"one.vm.action {name}")


def test_the_emulated_oned_replaces_the_whole_context(one):
    """The quirk the hook must work around, as the server implements it (naive extra template)."""
    assert parse_template('CONTEXT=[ USER_DATA="x" ]\nGLIDEIN_ENTRY="e"') == {
        "CONTEXT": {"USER_DATA": "x"}, "GLIDEIN_ENTRY": "e"}
    ok, vid, _ = one.instantiate(4, "naive", False, 'CONTEXT=[ USER_DATA="x" ]\nGLIDEIN_ENTRY="e"')
    assert ok and one.vms[vid]["TEMPLATE"]["CONTEXT"] == {"USER_DATA": "x"}  # NETWORK, SSH key: gone
    assert one.vms[vid]["USER_TEMPLATE"]["GLIDEIN_ENTRY"] == "e"


def test_context_keeps_the_template_context_and_carries_the_userdata(one):
    ids = hook().launch(spec(count=2))["created"]
    assert sum(1 for c in one.calls if c.path == "one.template.instantiate") == 2  # one call per VM
    vm = one.vms[int(ids[0])]
    ctx = vm["TEMPLATE"]["CONTEXT"]
    # the template's own CONTEXT survived (an extra CONTEXT replaces it whole) ...
    assert ctx["NETWORK"] == "YES" and ctx["REPORT_READY"] == "YES"
    assert ctx["SSH_PUBLIC_KEY"] == "$USER[SSH_PUBLIC_KEY]" and ctx["SET_HOSTNAME"] == vm["NAME"]
    # ... and carries the envelope the way one-context and cloud-init read it
    assert ctx["USERDATA_ENCODING"] == "base64"
    assert userdata.parse(base64.b64decode(ctx["USER_DATA"]).decode())["launch_id"] == "r1.nova.fermicloud.0"
    # the disk is the template's, with the entry's image; the size is the entry's
    assert vm["TEMPLATE"]["DISK"] == {"IMAGE_ID": "13", "DEV_PREFIX": "vd", "SIZE": "20480"}
    assert vm["TEMPLATE"]["VCPU"] == "4" and vm["TEMPLATE"]["MEMORY"] == "8192"
    # our ids are in the user template, next to the template's own user attributes
    user = vm["USER_TEMPLATE"]
    assert user["GLIDEIN_FACTORY"] == FACTORY and user["GLIDEIN_LAUNCH"] == "r1.nova.fermicloud.0"
    assert user["GLIDEIN_FRONTEND"] == "nova" and user["LOGO"] == "images/logos/centos.png"


def test_a_template_named_instead_of_numbered(one):
    assert len(hook(flavor="glidein-pilot").launch(spec(count=1))["created"]) == 1
    with pytest.raises(ValueError, match="fermicloud: 0 OpenNebula templates named 'no-such'"):
        hook(flavor="no-such").launch(spec(count=1, launch="r1.nova.fermicloud.1"))


def test_a_vm_ignoring_terminate_is_terminated_hard(one):
    ids = hook().launch(spec(count=3))["created"]
    one.ignore_terminate(ids[:1])
    report = hook().terminate_verified(ids)
    assert sorted(report.gone) == sorted(ids) and report.stuck == {}
    assert actions(one, "terminate") == 3 + 1  # everyone once, the stubborn one again
    assert actions(one, "terminate-hard") == 1
    assert one.live() == []


def test_terminate_refused_in_boot_is_reported_and_done_later(one):
    one.boot_state = "BOOT"
    ids = hook().launch(spec(count=2))["created"]
    assert {i.state for i in hook().list_pilots()} == {P.P_PENDING}
    report = hook().terminate_verified(ids)
    assert report.gone == [] and sorted(report.stuck) == sorted(ids)
    assert all("not available for state BOOT" in why for why in report.stuck.values())
    assert len(one.live()) == 2  # nothing lost track of
    one.set_lcm(ids, "RUNNING")  # booted meanwhile: the next cycle terminates them
    assert sorted(hook().terminate_verified(ids).gone) == sorted(ids)


def test_done_vms_leave_the_listing_and_stay_visible_by_id(one):
    h = hook()
    ids = h.launch(spec(count=2))["created"]
    h.terminate(ids[:1])
    assert [i.id for i in h.list_pilots()] == ids[1:]
    vm = h.one.vm.info(int(ids[0]))
    assert vm.STATE == STATES["DONE"]


def test_a_lost_instantiate_response_is_a_transport_error_and_the_retry_completes(one):
    one.lose_instantiate_responses = 1
    with pytest.raises(requests.ConnectionError):
        hook().launch(spec(count=3))
    assert len(one.live()) == 1  # made before the client lost the answer
    again = hook().launch(spec(count=3))
    assert len(again["existing"]) == 1 and len(again["created"]) == 2
    assert len(one.live()) == 3


def test_throttled_calls_back_off_and_succeed(one, sim_clock):
    one.clock = sim_clock
    one.throttle.set(4, 30)
    h = hook()
    ids = h.launch(spec(count=4))["created"]
    assert len(ids) == 4 and hook().terminate_verified(ids).stuck == {}
    assert one.throttle.refused > 0 and one.live() == []
    statuses = [c.status for c in one.calls]
    assert not any(a == b == 503 for a, b in zip(statuses, statuses[1:]))


def test_the_pool_is_read_in_pages(one):
    h = hook()
    h.launch(spec(count=5))
    h.page_size = 2
    before = len(one.calls)
    assert len(h.list_pilots()) == 5
    assert [c.path for c in one.calls[before:]] == ["one.vmpool.infoextended"] * 3


def test_a_bad_password_is_a_clear_error(one, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_ONE_TEST", one.connection_json().replace("one-secret", "wrong"))
    ok, msg = hook().test_connection()
    assert not ok and "authenticated" in msg and "wrong" not in msg
