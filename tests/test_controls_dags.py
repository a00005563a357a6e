"""Operator controls in whole DAG runs: downtimes and the stop switch hold launches (no provider call, no red
run) and send demand elsewhere; a pilot request is carried out by the factory's reap, even while stopped."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from airflow_glidein import controls, state
from airflow_glidein.hooks.ec2 import EC2PilotHook
from tests.helpers import example_config, run_dag, task_states, write_config, xcom
from tests.test_e2e_collector import collector_config, pool, register  # noqa: F401 - pool: the fixture

pytestmark = pytest.mark.usefixtures("airflow_db")
EAST, WEST = "aws-us-east-1", "aws-us-west-2"


def config(tmp_path, monkeypatch) -> dict:
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    cfg["entries"][1]["limits"] = {"max_pilots": 40, "max_idle": 40, "max_per_cycle": 40, "batch_size": 40}
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


@pytest.fixture
def launches(monkeypatch) -> Counter:
    """Launch calls per entry (each one lists, then creates, at the provider)."""
    calls: Counter = Counter()
    real = EC2PilotHook.launch

    def counted(self, spec, record=None):
        calls[self.entry.name] += 1
        return real(self, spec, record)

    monkeypatch.setattr(EC2PilotHook, "launch", counted)
    return calls


def test_an_entry_in_downtime_gets_no_launch_and_its_demand_moves(ec2, tmp_path, monkeypatch, launches):
    config(tmp_path, monkeypatch)
    before = xcom(run_dag("glidein_frontend_cms"), "plan_pilots")  # planned while east was up
    assert before["entries"][EAST]["idle"] > 0
    west_before = before["entries"][WEST]["idle"]
    now = time.time()
    controls.add(state.store(), controls.DOWNTIME, EAST, "cms", now, now + 3600, "hypervisor upgrade", "ops", now)

    # the factory holds the request it already has: nothing at east, no provider call for it, a green run
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert ec2.instances("us-east-1") == [] and launches[EAST] == 0
    assert len(ec2.instances("us-west-2")) == west_before and launches[WEST] == 1
    decisions = xcom(fa, "plan_cycle", key="decisions")
    assert decisions[EAST]["frontends"]["cms"]["refused"] == "downtime: hypervisor upgrade"

    # the frontend's next plan leaves east out, saying why, and the jobs that could run at either entry,
    # shared between both before, now all count at west: 31 idle jobs instead of 17
    after = xcom(run_dag("glidein_frontend_cms"), "plan_pilots")
    assert EAST not in after["entries"] and after["skipped"] == {EAST: "downtime: hypervisor upgrade"}
    was, now_west = before["entries"][WEST]["why"], after["entries"][WEST]["why"]
    assert (was["idle_jobs"], was["cores"], was["wanted"]) == (17, 44, 6)
    assert (now_west["idle_jobs"], now_west["cores"], now_west["wanted"]) == (31, 64, 8)
    assert after["entries"][WEST]["idle"] == west_before + 1  # 2 more wanted; curb_idle_per_entry halves the add
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert ec2.instances("us-east-1") == [] and launches[EAST] == 0
    assert len(ec2.instances("us-west-2")) == after["entries"][WEST]["idle"]


def test_a_stop_set_between_two_batches_stops_the_second(ec2, tmp_path, monkeypatch, launches):
    config(tmp_path, monkeypatch)
    run_dag("glidein_frontend_cms")
    real = EC2PilotHook.launch

    def first_then_stop(self, spec, record=None):
        made = real(self, spec, record)
        if self.entry.name == EAST:  # an operator pulls the switch while the submit is between batches
            now = time.time()
            controls.add(state.store(), controls.STOP, EAST, "", now, None, "account over budget", "ops", now)
        return made

    monkeypatch.setattr(EC2PilotHook, "launch", first_then_stop)
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    submits = {s["entry"]: s for s in xcom(fa, "submit_pilots", map_index=None)}
    assert len(submits[EAST]["launched"]) == 1  # east planned 10 in two batches of 5: the second was held
    assert [(h["count"], h["why"]) for h in submits[EAST]["held"]] == [(5, "stopped: account over budget")]
    assert len(ec2.instances("us-east-1")) == 5 and "held" not in submits[WEST]

    fa = run_dag("glidein_factory")  # the next cycle plans nothing there
    assert str(fa.state) == "success", task_states(fa)
    assert len(ec2.instances("us-east-1")) == 5
    assert xcom(fa, "plan_cycle", key="decisions").get(EAST, {}).get("launch", 0) == 0


def test_a_terminate_request_is_reaped_while_launches_are_stopped(ec2, tmp_path, monkeypatch, launches):
    config(tmp_path, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    run_dag("glidein_factory")  # the pilots are in the table
    ids = sorted(i["InstanceId"] for i in ec2.instances("us-east-1"))
    st, now = state.store(), time.time()
    controls.add(st, controls.STOP, "", "", now, None, "incident", "ops", now)
    calls = sum(launches.values())
    aid = controls.request_pilots(st, controls.TERMINATE, EAST, ids[:2], "misbehaving", "ops", now)

    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    actions = xcom(fa, "plan_cycle", key="actions")
    assert sorted(a["id"] for a in actions if a["action"] == "terminate") == ids[:2]
    assert all(a["reason"] == "terminated by ops: misbehaving" for a in actions)
    assert sorted(i["InstanceId"] for i in ec2.instances("us-east-1")) == ids[2:]
    assert sum(launches.values()) == calls  # stopped: not one launch call
    assert [a["id"] for a in controls.pending(st)] == [aid]  # settled once the next cycle sees them gone
    run_dag("glidein_factory")
    assert controls.pending(st) == []


def test_a_draining_downtime_retires_its_pilots_and_terminates_none(ec2, pool, tmp_path, monkeypatch):  # noqa: F811
    """The collector stand-in plays the pilots: a downtime without drain leaves them running; with drain
    their startds are asked to shut down peacefully (jobs finish), once, and nothing is terminated."""
    collector_config(tmp_path, monkeypatch, pool, jobs=2, max_pilots=10)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    busy, idle = sorted(i["InstanceId"] for i in ec2.instances())
    now = time.time()
    register(pool, busy, "Claimed", now - 60)
    register(pool, idle, "Unclaimed", now - 60)
    st = state.store()
    keep = controls.add(st, controls.DOWNTIME, EAST, "", now, None, "network work", "ops", now)
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    assert xcom(fa, "plan_cycle", key="actions") == [] and pool.commands == []  # they keep running

    controls.end(st, keep, "ops", time.time())
    controls.add(st, controls.DOWNTIME, EAST, "cms", time.time(), None, "decommission", "ops", time.time(), drain=True)
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    acts = {a["id"]: (a["action"], a["reason"]) for a in xcom(fa, "plan_cycle", key="actions")}
    why = f"downtime: decommission (draining entry {EAST} for frontend cms, by ops)"
    assert acts == {busy: ("retire", why), idle: ("retire", why)}
    assert sorted(pool.commands) == sorted(("OffPeaceful", f"slot1@glidein-{i}") for i in (busy, idle))
    assert {i["InstanceId"] for i in ec2.instances()} == {busy, idle}  # drained, not terminated
    fa = run_dag("glidein_factory")  # asked once: the next cycle asks no more
    assert not any(a["action"] == "retire" for a in xcom(fa, "plan_cycle", key="actions"))
    assert len(pool.commands) == 2
