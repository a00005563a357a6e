"""The same contract for every middleware hook, each against its real client and a server on 127.0.0.1.

EC2: the Amazon provider's EC2Hook against moto. OpenStack: openstacksdk
against tests/servers/nova.py. OpenNebula: pyone against
tests/servers/opennebula.py. HTCondor-G: htcondor2 against the schedd
stand-in (tests/standins/condor.py, from the demand work). What the provider
holds is always read on the server side, never through the hook under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import importlib.util

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope

FACTORY = "test-factory"
MIDDLEWARES = ["ec2", "openstack", "opennebula"]
if importlib.util.find_spec("tests.standins.condor") is not None:  # the schedd stand-in of the demand work
    MIDDLEWARES.append("htcondor_g")


@dataclass
class Cloud:
    entry: Entry
    conn_id: str
    held: Callable[[], dict[str, dict[str, str]]]  # live instance id -> our tags, read at the provider
    calls: Callable[[], int]  # API calls the provider has answered

    def hook(self, factory: str = FACTORY, entry: Entry | None = None):
        return pilot_hook(entry or self.entry, factory, self.conn_id)

    def spec(self, launch: str = "run1.cms.0", count: int = 3, frontend: str = "cms") -> LaunchSpec:
        env = signed_envelope(self.entry.middleware, {"factory": FACTORY, "entry": self.entry.name,
                                                      "frontend": frontend, "launch_id": launch})
        return LaunchSpec(launch_id=launch, frontend=frontend, count=count, image=self.entry.image,
                          userdata=env, request="cycle-7")


def _ec2(request) -> Cloud:
    ec2 = request.getfixturevalue("ec2")
    entry = Entry(name="aws-test", middleware="ec2", region="us-east-1", image="ami-1e749f67", flavor="c5.xlarge",
                  trust_domain="aws", options={"terminate_settle": 0})
    counted = {"n": 0}

    def held():
        return {i["InstanceId"]: {k: v for k, v in i["TagMap"].items() if k.startswith("glidein:")}
                for i in ec2.instances()}

    cloud = Cloud(entry, "glidein_aws_test", held, lambda: counted["n"])
    real_hook = cloud.hook

    def hook(*args, **kwargs):  # count the requests botocore sends (moto keeps no log)
        h = real_hook(*args, **kwargs)
        h.client.meta.events.register("response-received.ec2", lambda **_: counted.__setitem__("n", counted["n"] + 1))
        return h

    cloud.hook = hook
    return cloud


def _openstack(request) -> Cloud:
    nova = request.getfixturevalue("nova")
    entry = Entry(name="cern-test", middleware="openstack", region="RegionOne", image="img-glidein",
                  flavor="m1.pilot", trust_domain="cern", auth_method="app_credential",
                  options={"network": "net-private", "terminate_settle": 0})
    return Cloud(entry, "glidein_os_test",
                 lambda: {s["id"]: dict(s["metadata"]) for s in nova.live() if s["status"] != "SOFT_DELETED"},
                 lambda: len(nova.calls))


def _opennebula(request) -> Cloud:
    from airflow_glidein.hooks.opennebula import TAG

    one = request.getfixturevalue("one")
    entry = Entry(name="fermicloud-test", middleware="opennebula", image="12", flavor="4", trust_domain="fnal",
                  auth_method="username_password", cores=2, memory_mb=4096, options={"terminate_settle": 0})
    return Cloud(entry, "glidein_one_test",
                 lambda: {str(v["ID"]): {TAG[k]: str(x) for k, x in v["USER_TEMPLATE"].items() if k in TAG}
                          for v in one.live()},
                 lambda: len(one.calls))


def _htcondor_g(request) -> Cloud:
    from airflow_glidein.hooks.htcondor_g import ATTR
    from tests.standins import condor

    monkeypatch, tmp_path = request.getfixturevalue("monkeypatch"), request.getfixturevalue("tmp_path")
    pool = condor.Pool("contract-cm.test:9618")
    schedd = pool.add_schedd("schedd.contract.test")
    pool.install(monkeypatch)
    request.addfinalizer(pool.close)
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_GRID_TEST", '{"conn_type": "generic", "password": "a-scitoken"}')
    entry = Entry(name="osg-test", middleware="htcondor_g", trust_domain="osg", auth_method="scitoken",
                  options={"collector": pool.address, "schedd": "schedd.contract.test", "terminate_settle": 0,
                           "grid_resource": "condor ce.example.org ce.example.org:9619",
                           "credential_dir": str(tmp_path / "creds")})
    return Cloud(entry, "glidein_grid_test",
                 lambda: {f"{c}.{p}": {tag: str(ad[attr]) for tag, attr in ATTR.items() if attr in ad}
                          for (c, p), ad in schedd.jobs.items()},
                 lambda: schedd.calls)


@pytest.fixture(params=MIDDLEWARES)
def cloud(request) -> Cloud:
    return {"ec2": _ec2, "openstack": _openstack, "opennebula": _opennebula,
            "htcondor_g": _htcondor_g}[request.param](request)


def test_launch_a_batch_tags_every_instance(cloud):
    result = cloud.hook().launch(cloud.spec(count=4))
    assert result["existing"] == [] and len(result["created"]) == 4
    held = cloud.held()
    assert set(held) == set(result["created"])
    for tags in held.values():
        assert tags[P.TAG_FACTORY] == FACTORY
        assert tags[P.TAG_FRONTEND] == "cms"
        assert tags[P.TAG_ENTRY] == cloud.entry.name
        assert tags[P.TAG_LAUNCH] == "run1.cms.0"
        assert tags[P.TAG_REQUEST] == "cycle-7"


def test_lists_ours_by_tag_and_launch(cloud):
    mine = cloud.hook().launch(cloud.spec("run1.cms.0", count=2))["created"]
    also_mine = cloud.hook().launch(cloud.spec("run1.atlas.0", count=1, frontend="atlas"))["created"]
    # same provider, same credential: another factory, and another entry of ours
    cloud.hook(factory="other-factory").launch(cloud.spec("run1.cms.0", count=1))
    other_entry = cloud.entry.model_copy(update={"name": cloud.entry.name + "-b"})
    cloud.hook(entry=other_entry).launch(cloud.spec("run1.cms.0", count=1))
    assert len(cloud.held()) == 5

    hook = cloud.hook()
    listed = hook.list_pilots()
    assert sorted(i.id for i in listed) == sorted(mine + also_mine)
    assert {i.state for i in listed} <= {P.P_PENDING, P.P_RUNNING}
    assert {i.tags[P.TAG_FRONTEND] for i in listed} == {"cms", "atlas"}
    assert sorted(i.id for i in hook._list("run1.cms.0")) == sorted(mine)


def test_terminate_is_verified(cloud):
    ids = cloud.hook().launch(cloud.spec(count=3))["created"]
    report = cloud.hook().terminate_verified(ids)
    assert sorted(report.gone) == sorted(ids) and report.stuck == {}
    assert cloud.held() == {}
    assert cloud.hook().list_pilots() == []


def test_a_retried_launch_starts_nothing_new(cloud, monkeypatch):
    hook_class = type(cloud.hook())
    real_create = hook_class._create
    crashed = []

    def create_then_crash(self, spec, count, tags):
        made = real_create(self, spec, count, tags)
        if not crashed:
            crashed.append(len(made))
            raise ConnectionError("connection reset after the provider accepted the create")
        return made

    monkeypatch.setattr(hook_class, "_create", create_then_crash)
    with pytest.raises(ConnectionError):
        cloud.hook().launch(cloud.spec(count=3))
    assert len(cloud.held()) == 3
    again = cloud.hook().launch(cloud.spec(count=3))  # the retried task: a new hook, the same launch id
    assert again["created"] == [] and sorted(again["existing"]) == sorted(cloud.held())
    assert len(cloud.held()) == 3


def test_a_short_launch_is_completed_not_repeated(cloud):
    first = cloud.hook().launch(cloud.spec(count=2))["created"]
    again = cloud.hook().launch(cloud.spec(count=5))
    assert sorted(again["existing"]) == sorted(first) and len(again["created"]) == 3
    assert len(cloud.held()) == 5


def test_every_provider_call_takes_a_budget_token(cloud):
    hook = cloud.hook()
    ids = hook.launch(cloud.spec(count=3))["created"]
    hook.list_pilots()
    hook.terminate_verified(ids)
    assert cloud.calls() > 0
    assert hook.budget.used() == cloud.calls()

