"""HTCondor-G pilots: real htcondor2.Submit descriptions against the schedd stand-in (tests/standins/condor.py).

No schedd can run here; the stand-in stores real ClassAds, evaluates our
constraints with classad2 and records the real Submit objects, and tests
move grid jobs along (idle, running, held) as the remote side would.
"""

from __future__ import annotations

import base64
import os
import stat

import htcondor2
import pytest

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope

condor = pytest.importorskip("tests.standins.condor")  # the issue-3 stand-in

FACTORY = "grid-factory"
PROXY = "-----BEGIN CERTIFICATE-----\nMIIproxy-not-a-real-one\n-----END CERTIFICATE-----\n"


@pytest.fixture
def schedd(monkeypatch, tmp_path):
    pool = condor.Pool("glidein-cm.test:9618")
    sd = pool.add_schedd("schedd.glidein.test")
    pool.install(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_GRID_TEST", f'{{"conn_type": "generic", "password": {PROXY!r}}}'
                       .replace("'", '"').replace("\n", "\\n"))
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_EC2_GAHP", '{"conn_type": "aws", "login": "AKIAGAHPTEST", '
                                                        '"password": "gahp-secret-key"}')
    yield sd
    pool.close()


def entry(tmp_path, grid_resource: str = "condor ce.example.org ce.example.org:9619", **options) -> Entry:
    opts = {"collector": "glidein-cm.test:9618", "schedd": "schedd.glidein.test", "grid_resource": grid_resource,
            "executable": "/usr/libexec/glidein/pilot-wrapper", "credential_dir": str(tmp_path / "creds"),
            "terminate_settle": 0, **options}
    image = {"image": "ami-1e749f67", "flavor": "c5.xlarge"} if grid_resource.startswith("ec2") else {}
    return Entry(name="osg-ce", middleware="htcondor_g", cores=8, memory_mb=16000, trust_domain="osg",
                 auth_method="grid_proxy", options=opts, **image)


def spec(count: int = 3, launch: str = "r1.cms.osg-ce.0", image: str | None = None) -> LaunchSpec:
    env = signed_envelope("htcondor_g", {"factory": FACTORY, "entry": "osg-ce", "launch_id": launch})
    return LaunchSpec(launch_id=launch, frontend="cms", count=count, image=image or "", userdata=env, request="c1")


def test_grid_pilots_are_grid_jobs_with_arguments_and_a_proxy_file(schedd, tmp_path):
    ids = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test").launch(spec(count=3))["created"]
    assert ids == ["1.0", "1.1", "1.2"] and len(schedd.submits) == 1  # one cluster, one call
    sub = schedd.submits[0]["description"]
    assert isinstance(sub, htcondor2.Submit) and schedd.submits[0]["count"] == 3
    assert sub["universe"] == "grid" and sub["grid_resource"] == "condor ce.example.org ce.example.org:9619"
    args = sub["arguments"].split()
    assert args[:4] == ["-entry", "osg-ce", "-launch", "r1.cms.osg-ce.0"]
    assert userdata.parse(base64.b64decode(args[args.index("-envelope") + 1]).decode())["launch_id"] == "r1.cms.osg-ce.0"
    assert sub["request_cpus"] == "8" and sub["MY.GlideinLaunch"] == '"r1.cms.osg-ce.0"'
    proxy = sub["x509userproxy"]
    assert open(proxy).read() == PROXY and stat.S_IMODE(os.stat(proxy).st_mode) == 0o600
    assert "MIIproxy" not in str(sub)
    job = schedd.jobs[(1, 0)]
    assert job["JobUniverse"] == 9 and job["GlideinFactory"] == FACTORY and job["GlideinEntry"] == "osg-ce"


def test_ec2_pilots_go_through_the_ec2_gahp(schedd, tmp_path):
    e = entry(tmp_path, "ec2 https://ec2.us-east-1.amazonaws.com", ec2_keypair="ops")
    pilot_hook(e, FACTORY, "glidein_ec2_gahp").launch(spec(count=2, image="ami-1e749f67"))
    sub = schedd.submits[0]["description"]
    assert sub["grid_resource"] == "ec2 https://ec2.us-east-1.amazonaws.com"
    assert (sub["ec2_ami_id"], sub["ec2_instance_type"], sub["ec2_keypair"]) == ("ami-1e749f67", "c5.xlarge", "ops")
    assert userdata.parse(base64.b64decode(sub["ec2_user_data"]).decode())["entry"] == "osg-ce"
    assert open(sub["ec2_access_key_id"]).read() == "AKIAGAHPTEST"
    assert open(sub["ec2_secret_access_key"]).read() == "gahp-secret-key"
    assert stat.S_IMODE(os.stat(sub["ec2_secret_access_key"]).st_mode) == 0o600
    assert "gahp-secret-key" not in str(sub) and "arguments" not in sub


def test_held_pilots_are_released_then_removed_with_the_reason(schedd, tmp_path, caplog):
    hook = pilot_hook(entry(tmp_path, max_releases=2), FACTORY, "glidein_grid_test")
    ids = hook.launch(spec(count=2))["created"]
    reason = "Error from ce.example.org: globus_gram_protocol_error_10"
    for n in (1, 2):
        schedd.set_status("1.0", condor.HELD, reason)
        listed = {i.id: i for i in hook.list_pilots()}
        assert listed["1.0"].state == P.P_PENDING and f"({n} of 2)" in listed["1.0"].detail
        assert schedd.jobs[(1, 0)]["JobStatus"] == condor.IDLE
    schedd.set_status("1.0", condor.HELD, reason)
    listed = {i.id: i for i in hook.list_pilots()}
    assert listed["1.0"].state == P.P_TERMINATING and reason in listed["1.0"].detail
    assert "held again after 2 releases, removed" in caplog.text and reason in caplog.text
    assert (1, 0) not in schedd.jobs and (1, 1) in schedd.jobs
    assert [i.id for i in hook.list_pilots()] == ids[1:]


def test_a_grid_job_left_in_removed_state_is_forced(schedd, tmp_path):
    schedd.keep_removed = True  # condor_rm leaves X until the remote side confirms; it never does here
    hook = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test")
    ids = hook.launch(spec(count=2))["created"]
    report = hook.terminate_verified(ids)
    assert sorted(report.gone) == ids and report.steps == ["terminate: 2", "terminate again: 2", "force: 2"]
    assert schedd.jobs == {}


def test_a_bad_grid_resource_is_a_clear_error(schedd, tmp_path):
    """The entry's options schema (airflow_glidein.middlewares) refuses it when the configuration loads."""
    with pytest.raises(ValueError, match=r"options.grid_resource\n  Value error, must start with ec2, condor, arc or batch"):
        pilot_hook(entry(tmp_path, "gt2 gatekeeper.example.org"), FACTORY, "glidein_grid_test").launch(spec())
    assert schedd.submits == []
