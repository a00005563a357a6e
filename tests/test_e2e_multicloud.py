"""One frontend bursting onto three clouds at once: EC2 (moto), OpenStack (Nova) and OpenNebula.

The real frontend and factory DAGs from dags/, run with dag.test(); each
cloud is its real client against its server on 127.0.0.1. The factory has
no middleware-specific code: each entry's hook is chosen by its middleware.
The first create answer of Nova and of oned is lost, so those submit tasks
fail once and Airflow's retry must find what was made, not make it again.
"""

from __future__ import annotations

import base64
from collections import Counter

import pytest

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.hooks.opennebula import TAG as ONE_TAG
from tests.helpers import idle_jobs, run_dag, task_states, write_config, write_queue, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

ENTRIES = ["aws-us-east-1", "cern-openstack", "fermicloud"]


def multicloud_config(queue: str) -> dict:
    pilot = {"memory_mb": 8192, "limits": {"max_pilots": 20, "max_idle": 10, "max_per_cycle": 10, "batch_size": 4},
             "policy": {"max_lifetime": 43200}}
    return {
        "factory": {"name": "multi-factory", "bootstrap_url": "http://127.0.0.1:8080/glidein", "collector": None,
                    "retries": 2, "retry_delay": 0},
        "entries": [
            {"name": "aws-us-east-1", "middleware": "ec2", "region": "us-east-1", "image": "ami-1e749f67",
             "flavor": "c5.xlarge", "cores": 4, "attrs": {"GLIDEIN_Site": "AWS_US_EAST_1"},
             "trust_domain": "aws", "auth_method": "key_pair", **pilot},
            {"name": "cern-openstack", "middleware": "openstack", "region": "RegionOne", "endpoint": "nova-cern",
             "image": "img-glidein", "flavor": "m1.pilot", "cores": 4, "attrs": {"GLIDEIN_Site": "CERN"},
             "trust_domain": "cern", "auth_method": "app_credential",
             "api_budget": {"requests": 500, "per_seconds": 300},
             "options": {"network": "net-private", "key_name": "ops", "terminate_settle": 0}, **pilot},
            {"name": "fermicloud", "middleware": "opennebula", "endpoint": "one-fnal", "image": "12", "flavor": "4",
             "cores": 4, "attrs": {"GLIDEIN_Site": "FERMICLOUD"}, "trust_domain": "fnal",
             "auth_method": "username_password", "options": {"terminate_settle": 0}, **pilot},
        ],
        "frontends": [{
            "name": "cms", "schedule": None, "demand": {"queue_file": queue},
            "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites) && job.RequestCpus <= glidein.Cpus",
            "entries": ENTRIES,
            "credentials": ["aws-cms", "cern-cms", "fnal-cms", "pool-aws", "pool-cern", "pool-fnal"],
            "limits": {"max_idle": 100, "max_running": 200},
        }],
        "credentials": [
            {"id": "aws-cms", "type": "ec2_key_pair", "conn_id": "glidein_aws_demo", "trust_domain": "aws",
             "purpose": "provision"},
            {"id": "cern-cms", "type": "openstack_app_credential", "conn_id": "glidein_os_test",
             "trust_domain": "cern", "purpose": "provision"},
            {"id": "fnal-cms", "type": "opennebula_password", "conn_id": "glidein_one_test",
             "trust_domain": "fnal", "purpose": "provision"},
            *({"id": f"pool-{d}", "type": "idtoken", "conn_id": "glidein_cms_pool_token", "trust_domain": d,
               "purpose": "pilot"} for d in ("aws", "cern", "fnal")),
        ],
    }


def test_one_frontend_bursts_onto_three_clouds(ec2, nova, one, tmp_path, monkeypatch):
    jobs = (idle_jobs(12, "AWS_US_EAST_1", cpus=1)  # 12 cores: 3 pilots of 4
            + idle_jobs(6, "CERN", cpus=4, start=2)  # 6 pilots
            + idle_jobs(20, "FERMICLOUD", cpus=2, start=3))  # 40 cores: 10 pilots, in batches of 4
    write_config(tmp_path, multicloud_config(write_queue(tmp_path, jobs)), monkeypatch)

    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success", task_states(fe)
    planned = {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()}
    assert planned == {"aws-us-east-1": 3, "cern-openstack": 6, "fermicloud": 10}

    # Nova's and oned's answer to the first create is lost: Airflow retries those tasks
    nova.lose_create_responses = 1
    one.lose_instantiate_responses = 1
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert nova.lose_create_responses == one.lose_instantiate_responses == 0
    assert sum(c.method == "POST" and c.path.endswith("/servers") for c in nova.calls) == 2  # 4 + 2, none twice
    aws = ec2.instances()
    cern = nova.live()
    fnal = one.live()
    assert (len(aws), len(cern), len(fnal)) == (3, 6, 10)

    # every pilot carries our ids at its provider, and one envelope naming its launch
    tags = {
        "aws-us-east-1": [i["TagMap"] for i in aws],
        "cern-openstack": [s["metadata"] for s in cern],
        "fermicloud": [{ONE_TAG[k]: v for k, v in vm["USER_TEMPLATE"].items() if k in ONE_TAG} for vm in fnal],
    }
    for entry, per_pilot in tags.items():
        for t in per_pilot:
            assert (t[P.TAG_FACTORY], t[P.TAG_FRONTEND], t[P.TAG_ENTRY]) == ("multi-factory", "cms", entry)
    assert Counter(t[P.TAG_LAUNCH].rsplit(".", 1)[1] for t in tags["fermicloud"]) == {"0": 4, "1": 4, "2": 2}
    envelope = userdata.parse(base64.b64decode(nova.servers[cern[0]["id"]]["user_data"]).decode())
    assert envelope["launch_id"] == cern[0]["metadata"][P.TAG_LAUNCH] and envelope["entry"] == "cern-openstack"
    context = fnal[0]["TEMPLATE"]["CONTEXT"]
    assert context["NETWORK"] == "YES"
    assert userdata.parse(base64.b64decode(context["USER_DATA"]).decode())["entry"] == "fermicloud"

    status = xcom(fa, "report")
    assert {e: status["pilots"][e]["cms"]["requested"] for e in ENTRIES} == planned
    assert status["errors"] == {}

    # the next cycle lists all three clouds by tag and launches nothing again
    again = run_dag("glidein_factory")
    assert str(again.state) == "success", task_states(again)
    assert xcom(again, "plan_cycle") == []
    counts = xcom(again, "inventory")["counts"]
    assert {e: counts[e]["cms"]["booting"] for e in ENTRIES} == planned
    assert (len(ec2.instances()), len(nova.live()), len(one.live())) == (3, 6, 10)


def test_openstack_launches_stay_within_the_project_quota(ec2, nova, one, tmp_path, monkeypatch):
    """Cloud Scheduler's lesson: read the quota and plan within it. Nova would refuse a batch beyond it
    (403), the submit would fail and back the entry off; instead the factory launches what fits."""
    jobs = idle_jobs(6, "CERN", cpus=4)  # 6 pilots of 4 cores wanted
    write_config(tmp_path, multicloud_config(write_queue(tmp_path, jobs)), monkeypatch)
    nova.quota_cores = 14  # the project has room for 3 pilots of 4 cores
    run_dag("glidein_frontend_cms")
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert len(nova.live()) == 3
    decision = xcom(fa, "plan_cycle", key="decisions")["cern-openstack"]
    assert decision["launch"] == 3 and decision["bound_by"] == "provider quota (instances 100000, cores 14 left)"
    assert xcom(fa, "report")["backoff"] == {}  # nothing was refused, nothing backed off
    assert not any(c.status == 403 for c in nova.calls)
    # the next cycle sees the quota spent (2 cores left): it launches nothing and says why
    again = run_dag("glidein_factory")
    decision = xcom(again, "plan_cycle", key="decisions")["cern-openstack"]
    assert decision["launch"] == 0 and decision["bound_by"] == "provider quota (instances 99997, cores 2 left)"
    assert sum(c.path.endswith("/limits") for c in nova.calls) == 2  # one quota read per cycle


def test_a_quota_that_cannot_be_read_does_not_hold_launches_back(ec2, nova, one, tmp_path, monkeypatch, capfd):
    from airflow_glidein.hooks.openstack import OpenStackPilotHook

    def unreadable(self):
        raise ConnectionError("limits endpoint down")

    monkeypatch.setattr(OpenStackPilotHook, "quota", unreadable)
    write_config(tmp_path, multicloud_config(write_queue(tmp_path, idle_jobs(6, "CERN", cpus=4))), monkeypatch)
    run_dag("glidein_frontend_cms")
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert len(nova.live()) == 6
    assert "reading the provider quota with glidein_os_test failed, launches are not bound by it" in capfd.readouterr().out


def test_opennebula_launches_stay_within_the_users_vm_quota(ec2, nova, one, tmp_path, monkeypatch):
    """oned refuses an instantiate beyond the user's VMS quota; the factory reads the quota (one.user.info)
    and launches what fits. -1 means the default user quota."""
    write_config(tmp_path, multicloud_config(write_queue(tmp_path, idle_jobs(20, "FERMICLOUD", cpus=2))), monkeypatch)
    one.quota_vms, one.default_quota_vms = "-1", "7"  # the default quota: 7 VMs
    run_dag("glidein_frontend_cms")  # 10 pilots wanted
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert len(one.live()) == 7
    decision = xcom(fa, "plan_cycle", key="decisions")["fermicloud"]
    assert decision["launch"] == 7 and decision["bound_by"] == "provider quota (instances 7 left)"
    assert xcom(fa, "report")["backoff"] == {} and not any(c.status != 200 for c in one.calls)
