"""Reaping that never leaks a VM: verification, escalation and stuck reporting, as DAG runs on moto."""

from __future__ import annotations

import pytest

from airflow_glidein import pilotdb, state
from airflow_glidein import pilots as P
from airflow_glidein.hooks.ec2 import EC2PilotHook
from airflow_glidein.lifecycle import TERMINATE_DEADLINE
from tests.helpers import Clock, example_config, idle_jobs, run_dag, task_states, write_config, write_queue, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def one_entry(tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=2, verify_poll=1)
    cfg["entries"] = cfg["entries"][:1]
    cfg["entries"][0]["policy"] = {"max_lifetime": 3600}
    fe = cfg["frontends"][0]
    fe.update(entries=["aws-us-east-1"], request_ttl=100000)
    fe["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(2, "AWS_US_EAST_1", cpus=4))  # 2 pilots
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


def pilot_rows():
    """The pilot table of the one entry, by provider id."""
    return {r["id"]: r for r in pilotdb.load_pilots(state.store(), ["aws-us-east-1"]).values()}


def test_vm_that_ignores_terminate_is_escalated_then_reported_stuck(ec2, one_entry, monkeypatch):
    clock = Clock(monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    ids = {i["InstanceId"] for i in ec2.instances()}
    assert len(ids) == 2
    calls = []
    # These VMs ignore every terminate, forced or not.
    monkeypatch.setattr(EC2PilotHook, "_terminate", lambda self, ids: calls.append(("terminate", sorted(ids))))
    monkeypatch.setattr(EC2PilotHook, "_force_terminate", lambda self, ids: calls.append(("force", sorted(ids))))
    ec2.age(ids, 7200)

    run1 = run_dag("glidein_factory")  # attempt 1; the verify sensor defers, times out, fails naming them
    states = task_states(run1)
    assert states["reap_pilots"] == "success" and states["verify_terminations"] == "failed"
    assert calls == [("terminate", sorted(ids))]
    assert {pid: r["state"] for pid, r in pilot_rows().items() if pid in ids} == {i: P.TERMINATING for i in ids}

    clock.offset = TERMINATE_DEADLINE + 1
    run_dag("glidein_factory")  # attempt 2: terminate again
    clock.offset = 2 * (TERMINATE_DEADLINE + 1)
    run_dag("glidein_factory")  # attempt 3: the force variant
    assert [c[0] for c in calls] == ["terminate", "terminate", "force"]
    clock.offset = 3 * (TERMINATE_DEADLINE + 1)
    last = run_dag("glidein_factory")
    rows = {pid: r for pid, r in pilot_rows().items() if pid in ids}
    assert {r["state"] for r in rows.values()} == {P.STUCK}
    assert all(r["memory"]["terminate_attempts"] == 4 for r in rows.values())
    status = xcom(last, "report")
    assert status["stuck"] == sorted(P.pilot_key("aws-us-east-1", i) for i in ids)
    assert status["pilots"]["aws-us-east-1"]["cms"]["stuck"] == 2
    # never silently dropped, never counted as capacity: the frontend's level (2) was launched anew
    # in the cycle that first terminated them, and not again
    assert len(ec2.instances()) == 4


def test_vm_that_yields_only_to_force_ends_terminated(ec2, one_entry, monkeypatch):
    clock = Clock(monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    ids = {i["InstanceId"] for i in ec2.instances()}
    real_terminate = EC2PilotHook._terminate
    monkeypatch.setattr(EC2PilotHook, "_terminate", lambda self, ids: None)  # ignored
    monkeypatch.setattr(EC2PilotHook, "_force_terminate", real_terminate)  # obeyed
    ec2.age(ids, 7200)
    for step in range(3):
        clock.offset = step * (TERMINATE_DEADLINE + 1)
        run_dag("glidein_factory")
    assert not ({i["InstanceId"] for i in ec2.instances()} & ids)
    clock.offset = 3 * (TERMINATE_DEADLINE + 1)
    run = run_dag("glidein_factory")
    assert str(run.state) == "success", task_states(run)
    assert xcom(run, "inventory")["gone"] == 2  # verified gone, then forgotten
    assert not (set(pilot_rows()) & ids)


def test_stopped_vm_is_terminated_not_counted(ec2, one_entry):
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    victim = ec2.instances()[0]["InstanceId"]
    ec2.client().stop_instances(InstanceIds=[victim])
    run = run_dag("glidein_factory")
    actions = xcom(run, "plan_cycle", key="actions")
    assert [(a["id"], a["action"]) for a in actions] == [(victim, "terminate")]
    assert victim not in {i["InstanceId"] for i in ec2.instances()}
    # a replacement is launched: a stopped VM is not capacity
    assert len(ec2.instances()) == 2
