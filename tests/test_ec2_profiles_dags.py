"""Factory DAG runs on EC2-compatible clouds with loose semantics, per quirk profile (eucalyptus, generic),
against the EC2-compatible proxy: the planned count reached and never exceeded over several cycles, a
SIGKILL between create and marking neither duplicates nor loses, a terminate that does nothing is
escalated and reported, and the launch key pairs go once their instances are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from airflow_glidein import budget, pilotdb, state
from airflow_glidein import pilots as P
from tests.faults import KILL_AFTER_CREATE
from tests.helpers import (
    REPO, Clock, idle_jobs, resume_run, run_dag, task_states, write_queue, xcom, zombies_up_for_retry)
from tests.test_exactly_once import EAST, one_entry, rows

pytestmark = pytest.mark.usefixtures("airflow_db")

SWITCHES = {  # what each profile's endpoint does, as the proxy plays it
    "eucalyptus": {"client_token": "eucalyptus", "tags": "refuse_on_create", "max_per_call": 2},
    "generic": {"client_token": "ignore", "tags": "drop", "ignore_filters": True, "max_per_call": 1},
}


class HookClock:
    """The hooks' clock (budget.CLOCK: marker ages, settle waits) on the test's frozen clock; sleeps pass."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.now()

    def sleep(self, seconds: float) -> None:
        pass


def setup(profile, ec2_compat, tmp_path, monkeypatch, lag=0.0, **entry):
    clock = Clock(monkeypatch, frozen=True)
    ec2_compat.clock = clock.time
    monkeypatch.setattr(budget, "CLOCK", HookClock(clock))
    ec2_compat.set(lag=lag, **SWITCHES[profile])
    one_entry(tmp_path, monkeypatch, pilots=6, batch=4, options={"profile": profile}, listing_grace=100,
              policy={"max_lifetime": 3600, "terminate_deadline": 120}, **entry)
    run_dag("glidein_frontend_cms")
    return clock


def by_marker(ec2_compat, live_only=True) -> Counter:
    return Counter(i.get("KeyName") for i in ec2_compat.moto.instances("us-east-1", live_only))


def key_pairs(ec2_compat) -> list[str]:
    return sorted(k["KeyName"] for k in ec2_compat.client().describe_key_pairs()["KeyPairs"])


@pytest.mark.parametrize("profile", ["eucalyptus", "generic"])
def test_cycles_reach_the_planned_count_and_never_exceed_it(profile, ec2_compat, tmp_path, monkeypatch):
    """New instances lag 30 s out of every listing; the endpoint keeps (or takes) no tags at create. Each
    cycle lists our instances by their launch key pairs: the 6 planned are made once, never again."""
    clock = setup(profile, ec2_compat, tmp_path, monkeypatch, lag=30)
    planned: Counter = Counter()
    for offset in (0, 10, 40, 80, 200):
        clock.offset = offset
        run = run_dag("glidein_factory")
        assert str(run.state) == "success", task_states(run)
        for item in xcom(run, "plan_cycle"):
            for b in item["launches"]:
                planned[b["launch_id"]] += b["count"]
        assert len(ec2_compat.instances()) <= 6
    made = by_marker(ec2_compat, live_only=False)
    assert sum(made.values()) == 6 and len(ec2_compat.instances()) == 6
    assert {k.split(f".{EAST}.", 1)[1]: n for k, n in made.items()} == planned  # each launch its count, once
    ours = rows()
    assert set(ours) == {i["InstanceId"] for i in ec2_compat.instances()}  # 0 untracked
    assert {r["state"] for r in ours.values()} == {P.BOOTING} and {r["frontend"] for r in ours.values()} == {"cms"}
    assert key_pairs(ec2_compat) == sorted(made)  # one marker per launch, in use


@pytest.mark.parametrize("profile", ["eucalyptus", "generic"])
def test_a_terminate_that_does_nothing_is_escalated_reported_and_its_markers_cleaned(
        profile, ec2_compat, tmp_path, monkeypatch):
    clock = setup(profile, ec2_compat, tmp_path, monkeypatch)
    run_dag("glidein_factory")
    ids = sorted(i["InstanceId"] for i in ec2_compat.instances())
    assert len(ids) == 6 and key_pairs(ec2_compat)
    write_queue(tmp_path, idle_jobs(0, "AWS_US_EAST_1"))  # the demand is over: no replacements
    run_dag("glidein_frontend_cms")
    ec2_compat.age(ids, 2 * 3600)  # past max_lifetime
    ec2_compat.set(terminate_noop=1.0)  # answered shutting-down, left running
    clock.offset = 300
    run_dag("glidein_factory")
    assert {r["state"] for r in rows().values()} == {P.TERMINATING}
    for step in (1, 2, 3, 4):  # terminate again, force, then stuck: never dropped, never capacity
        clock.offset = 300 + step * 121
        last = run_dag("glidein_factory")
    assert len(ec2_compat.instances()) == 6  # the endpoint still did nothing
    assert {r["state"] for r in rows().values()} == {P.STUCK}
    assert xcom(last, "report")["stuck"] == [P.pilot_key(EAST, i) for i in ids]
    ec2_compat.set(terminate_noop=0.0)  # the endpoint acts again: the next forced attempt ends them
    clock.offset = 300 + 5 * 121
    run_dag("glidein_factory")
    assert ec2_compat.instances() == []
    clock.offset = 300 + 6 * 121
    run_dag("glidein_factory")  # listed gone: the markers have no instance left
    assert rows() == {} and key_pairs(ec2_compat) == []
    assert pilotdb.load_markers(state.store(), EAST) == {}


@pytest.mark.parametrize("profile", ["eucalyptus", "generic"])
def test_a_sigkill_between_create_and_marking_loses_and_duplicates_nothing(
        profile, ec2_compat, tmp_path, monkeypatch):
    """The task process dies right after a RunInstances answered, before its ids were recorded or tagged.
    The key pair was made before the call: the retry finds the instances by it."""
    ec2_compat.set(**SWITCHES[profile])
    one_entry(tmp_path, monkeypatch, pilots=6, batch=4, retries=2, options={"profile": profile})
    run_dag("glidein_frontend_cms")
    when = "2026-01-01T00:00:00+00:00"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CREATE, str(REPO), when], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = ec2_compat.instances()
    assert 1 <= len(first) <= SWITCHES[profile]["max_per_call"]  # one call's instances, unrecorded
    assert all(i["TagMap"] == {} for i in first)  # never tagged

    run_id = zombies_up_for_retry("glidein_factory")  # the scheduler's zombie handling
    resumed = resume_run("glidein_factory", run_id)
    assert str(resumed.state) == "success", task_states(resumed)
    planned = {b["launch_id"]: b["count"] for item in xcom(resumed, "plan_cycle") for b in item["launches"]}
    assert sum(planned.values()) == 6 and len(ec2_compat.instances()) == 6  # nothing lost, nothing twice
    made = by_marker(ec2_compat, live_only=False)
    assert {k.split(f".{EAST}.", 1)[1]: n for k, n in made.items()} == planned  # each launch exactly its count
    again = run_dag("glidein_factory")  # the next cycle: all listed, all ours, nothing launched
    assert xcom(again, "plan_cycle") == [] and len(ec2_compat.instances()) == 6
    assert set(rows()) == {i["InstanceId"] for i in ec2_compat.instances()}  # 0 untracked
    assert {r["frontend"] for r in rows().values()} == {"cms"}
