"""Listing lag on the Nova and oned test servers, and oned's in-band overload, through the real clients.

openstacksdk against tests/servers/nova.py and pyone against
tests/servers/opennebula.py, on a simulated clock the servers share with the
test: a server or VM younger than ``lag`` is missing from every listing and
unknown by id; oned refuses writes in-band when overloaded.
"""

from __future__ import annotations

import pyone
import pytest
from openstack import exceptions as os_exc

from tests.servers.common import SimClock


def compute(nova):
    import openstack

    conn = openstack.connection.Connection(
        auth_type="v3applicationcredential", region_name="RegionOne",
        auth={"auth_url": f"{nova.base}/identity/v3", "application_credential_id": "app-cred-id",
              "application_credential_secret": "app-cred-secret"})
    return conn.compute


def oned(one) -> pyone.OneServer:
    return pyone.OneServer(f"{one.base}/RPC2", session=one.session)


def instantiate(client, name: str) -> int:
    return client.template.instantiate(4, name, False, "", False)


def pool(client) -> list[int]:
    return sorted(int(vm.ID) for vm in client.vmpool.infoextended(-3, -1, -1, -1).VM)


def test_nova_lists_new_servers_only_after_the_lag(nova):
    clock = SimClock()
    nova.clock, nova.lag = clock, 30
    api = compute(nova)
    made = [api.create_server(name=f"pilot-{n}", image_id="img-glidein", flavor_id="f-4c8g",
                              networks=[{"uuid": "net-private"}]).id for n in range(2)]
    assert len(nova.servers) == 2
    assert list(api.servers()) == list(api.servers(details=False)) == []
    with pytest.raises(os_exc.NotFoundException):
        api.get_server(made[0])
    clock.sleep(29)
    assert list(api.servers(name="pilot")) == []
    clock.sleep(1)
    assert sorted(s.id for s in api.servers(name="pilot")) == sorted(made)
    assert api.get_server(made[1]).status == "ACTIVE"


def test_oned_pools_list_new_vms_only_after_the_lag_and_info_calls_them_unknown(one):
    clock = SimClock()
    one.clock, one.lag = clock, 30
    client = oned(one)
    assert [instantiate(client, "a"), instantiate(client, "b")] == [0, 1]  # a fresh oned numbers from 0
    assert pool(client) == [] and list(client.vmpool.info(-3, -1, -1, -1).VM) == []
    with pytest.raises(pyone.OneNoExistsException, match=r"^\[one.vm.info\] Error getting virtual machine \[0\]\.$"):
        client.vm.info(0)
    client.vm.action("terminate", 1)  # oned itself knows the VM: writes act on it
    clock.sleep(30)
    assert pool(client) == [0] and client.vm.info(1).STATE == 6  # DONE


def test_oned_overload_refuses_writes_in_band_and_answers_reads(one):
    one.overload = "election"
    one.throttle.random(1.0, seed=0)  # every call past the (absent) limit: every write refused
    client = oned(one)
    with pytest.raises(pyone.OneInternalException) as info:
        instantiate(client, "a")
    assert str(info.value) == "[one.template.instantiate] Cannot process request, oned cluster in election mode"
    assert one.vms == {} and one.calls[-1].status == 0x2000  # refused before it ran, in an HTTP 200 answer
    assert pool(client) == [] and client.system.version() == "6.10.0"  # reads are not leader-only

    one.overload = "no_leader"
    one.throttle.set(2, window=60)  # past 2 writes in a minute
    one.clock = SimClock()
    assert [instantiate(client, "a"), instantiate(client, "b")] == [0, 1]
    with pytest.raises(pyone.OneInternalException, match="Cannot process request, no leader found"):
        client.vm.action("terminate", 0)
    assert one.throttle.refused == 1
