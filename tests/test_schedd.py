"""The schedd path: HTCondorHook through htcondor2 against the pool stand-in (tests/standins/condor.py).

No schedd can run here; the stand-in replaces htcondor2.Collector and
htcondor2.Schedd and keeps real classad2 ads. The hook and demand code are
the product's, unchanged.
"""

from __future__ import annotations

import logging
import time

import htcondor2
import pytest

from airflow_glidein import demand
from airflow_glidein.config import DemandSource
from airflow_glidein.hooks.htcondor import HTCondorHook
from tests.helpers import example_config, run_dag, task_states, write_config, xcom
from tests.standins.condor import HELD, RUNNING, Pool

ATTRS = ["DESIRED_Sites", "RequestCpus", "RequestGPUs", "RequestMemory"]
REAL_SCHEDD = htcondor2.Schedd  # before any test installs the stand-in
log = logging.getLogger("test")
OLD = time.time() - 3600


@pytest.fixture
def pool(monkeypatch):
    p = Pool().install(monkeypatch)
    yield p
    p.close()


def fill(sd, east: int = 30, shared: int = 24, running: int = 5):
    sd.add_jobs({"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1", "Owner": "cms"}, east, qdate=OLD)
    sd.add_jobs({"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1,AWS_US_WEST_2",
                 "Owner": "cms"}, shared)
    sd.add_jobs({"RequestCpus": 8, "RequestMemory": 16000, "DESIRED_Sites": "AWS_US_WEST_2", "Owner": "cms"},
                running, status=RUNNING)
    sd.add_jobs({"RequestCpus": 1, "DESIRED_Sites": "AWS_US_EAST_1", "Owner": "cms"}, 3, status=HELD)


def counts(groups):
    return {(g.attrs.get("DESIRED_Sites"), g.attrs.get("RequestCpus")): (g.idle, g.running, g.idle_old) for g in groups}


def source(**kw) -> DemandSource:
    return DemandSource(**{"collector": "standin-collector.test:9618", "timeout": 5, **kw})


def test_groupby_query_counts_idle_running_and_old(pool):
    sd = pool.add_schedd("schedd1.example.org")
    fill(sd)
    groups, missing = demand.collect(source(), ATTRS, HTCondorHook(collector=pool.address), log)
    assert missing == []
    assert counts(groups) == {
        ("AWS_US_EAST_1", 1): (30, 0, 30),
        ("AWS_US_EAST_1,AWS_US_WEST_2", 1): (24, 0, 0),  # queued just now: not old
        ("AWS_US_WEST_2", 8): (0, 5, 0),
    }  # held jobs are not demand
    # the schedd did the grouping: GroupBy over exactly what matching reads, plus JobStatus
    q = sd.queries[0]
    assert q["opts"] == htcondor2.QueryOpt.GroupBy
    assert sorted(q["projection"]) == sorted(ATTRS + ["JobStatus"])
    assert "JobStatus == 1 || JobStatus == 2" in q["constraint"]


def test_constraint_and_every_schedd_of_the_collector(pool):
    a, b = pool.add_schedd("a.example.org"), pool.add_schedd("b.example.org")
    fill(a)
    b.add_jobs({"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1", "Owner": "atlas"}, 7)
    b.add_jobs({"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1", "Owner": "cms"}, 2, qdate=OLD)
    groups, missing = demand.collect(source(constraint='Owner == "cms"'), ATTRS, HTCondorHook(collector=pool.address), log)
    assert counts(groups)[("AWS_US_EAST_1", 1)] == (32, 0, 32)  # 30 from a, 2 from b; atlas's 7 left out
    # named schedds: only those are asked
    asked_a = len(a.queries)
    groups, _ = demand.collect(source(schedds=["b.example.org"]), ATTRS, HTCondorHook(collector=pool.address), log)
    assert sum(g.idle for g in groups) == 9 and len(a.queries) == asked_a


def test_old_schedd_without_groupby_is_grouped_client_side(pool):
    new, old = pool.add_schedd("new"), pool.add_schedd("old")
    fill(new)
    fill(old)
    old.groupby = False
    groups, missing = demand.collect(source(), ATTRS, HTCondorHook(collector=pool.address), log)
    assert missing == []
    assert counts(groups)[("AWS_US_EAST_1", 1)] == (60, 0, 60)
    assert counts(groups)[("AWS_US_WEST_2", 8)] == (0, 10, 0)
    # the fallback asked for the job ads, projected to what matching reads and QDate
    assert old.queries[-1]["opts"] == htcondor2.QueryOpt.Default
    assert sorted(old.queries[-1]["projection"]) == sorted(ATTRS + ["JobStatus", "QDate"])


def test_a_schedd_that_times_out_is_skipped_and_named(pool):
    good, hung = pool.add_schedd("good"), pool.add_schedd("hung")
    fill(good)
    fill(hung)
    hung.hang()
    start = time.monotonic()
    groups, missing = demand.collect(source(timeout=1), ATTRS, HTCondorHook(collector=pool.address), log)
    assert time.monotonic() - start < 3  # the timeout holds; nothing waits for the hung schedd
    assert [m["schedd"] for m in missing] == ["hung"]
    assert "no answer within the 1 s timeout" in missing[0]["error"]
    assert counts(groups)[("AWS_US_EAST_1", 1)] == (30, 0, 30)  # the good schedd's demand only


def test_a_failing_schedd_is_skipped_and_all_failing_is_an_error(pool):
    good, bad = pool.add_schedd("good"), pool.add_schedd("bad")
    fill(good)
    bad.fail("Failed to connect to schedd")
    groups, missing = demand.collect(source(), ATTRS, HTCondorHook(collector=pool.address), log)
    assert missing == [{"schedd": "bad", "error": "HTCondorException: Failed to query schedd bad: Failed to connect to schedd"}]
    good.fail()
    with pytest.raises(RuntimeError, match="no schedd answered"):
        demand.collect(source(), ATTRS, HTCondorHook(collector=pool.address), log)


def test_collector_down_or_hung_is_an_error_not_a_hang(pool):
    pool.add_schedd("a")
    pool.collector.hang()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="collector did not list the schedds: no answer within"):
        demand.collect(source(timeout=1), ATTRS, HTCondorHook(collector=pool.address), log)
    assert time.monotonic() - start < 3


def test_standin_keeps_real_ads_for_startds_submits_and_actions(pool):
    """What later hooks rely on: startd ads through the collector, submits with real Submit objects."""
    pool.add_startd({"Name": "slot1@pilot-1", "GLIDEIN_PILOT_ID": "i-1", "GLIDEIN_Factory": "f", "State": "Unclaimed",
                     "Activity": "Idle"})
    pool.add_startd({"Name": "slot1@other", "GLIDEIN_Factory": "g", "State": "Claimed"})
    ads = HTCondorHook(collector=pool.address).query_startds('GLIDEIN_Factory == "f"', ["GLIDEIN_PILOT_ID", "State"])
    assert ads == [{"GLIDEIN_PILOT_ID": "i-1", "State": "Unclaimed"}]

    sd = pool.add_schedd("grid")
    schedd = htcondor2.Schedd(htcondor2.Collector(pool.address).locate(htcondor2.DaemonType.Schedd, "grid"))
    result = schedd.submit(htcondor2.Submit({"universe": "grid", "grid_resource": "ec2 https://ec2.example",
                                             "executable": "/bin/true", "+GlideinLaunch": '"L1"'}), count=2)
    assert isinstance(result, htcondor2.SubmitResult) and result.num_procs() == 2
    ads = schedd.query('GlideinLaunch == "L1"', ["ClusterId", "ProcId", "JobStatus", "JobUniverse", "GridResource"])
    assert [(a["ProcId"], a["JobStatus"], a["JobUniverse"]) for a in ads] == [(0, 1, 9), (1, 1, 9)]
    assert sd.submits[0]["description"]["grid_resource"] == "ec2 https://ec2.example"
    sd.set_status(f"{result.cluster()}.0", RUNNING)
    schedd.act(htcondor2.JobAction.Hold, [f"{result.cluster()}.1"], "test hold")
    assert sorted(a["JobStatus"] for a in schedd.query("true", ["JobStatus"])) == [RUNNING, HELD]
    schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {result.cluster()}")
    assert schedd.query("true", ["JobStatus"]) == []


def test_frontend_dag_reads_demand_from_standin_schedds(pool, tmp_path, monkeypatch, airflow_db, ec2):
    """A whole frontend run: demand from two stand-in schedds (one hung), plan, request published.
    (``ec2`` only for the connections the credential selection reads; the frontend calls no cloud.)"""
    good, hung = pool.add_schedd("schedd1"), pool.add_schedd("schedd2")
    fill(good)
    hung.add_jobs({"RequestCpus": 1, "RequestMemory": 2000, "DESIRED_Sites": "AWS_US_EAST_1"}, 500)
    hung.hang()
    cfg = example_config()
    cfg["factory"]["retry_delay"] = 0
    cfg["frontends"][0]["demand"] = {"collector": pool.address, "constraint": 'Owner == "cms"', "timeout": 2}
    write_config(tmp_path, cfg, monkeypatch)
    run = run_dag("glidein_frontend_cms")
    assert str(run.state) == "success", task_states(run)
    request = xcom(run, "plan_pilots")
    assert [m["schedd"] for m in request["missing_schedds"]] == ["schedd2"]
    # east: 30 + 24/2 = 42 one-core jobs / 4 cores = 10.5 -> 11; west: 12 one-core jobs / 8 = 1.5 -> 2
    assert request["entries"]["aws-us-east-1"]["idle"] == 11
    assert request["entries"]["aws-us-west-2"]["idle"] == 2
    assert request["demand"] == {"groups": 3, "idle": 54, "running": 5, "idle_unmatched": 0}
    assert request["start_expr"] == "TARGET.RequestCpus <= MY.Cpus"


def test_timeout_holds_with_the_real_bindings_against_a_silent_schedd(pool, monkeypatch):
    """The real htcondor2.Schedd against a socket that accepts and never answers: the query blocks
    (HTCondor's own timeout is 20 s) without holding the GIL, and the frontend's timeout holds."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def accept_and_say_nothing():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    good = pool.add_schedd("good")
    fill(good)
    pool.add_schedd("silent", address=f"<127.0.0.1:{srv.getsockname()[1]}>")
    stand_in = htcondor2.Schedd
    monkeypatch.setattr(htcondor2, "Schedd", lambda location: (
        REAL_SCHEDD(location) if location["Name"] == "silent" else stand_in(location)))
    start = time.monotonic()
    groups, missing = demand.collect(source(timeout=1), ATTRS, HTCondorHook(collector=pool.address), log)
    assert time.monotonic() - start < 5
    assert [m["schedd"] for m in missing] == ["silent"] and "timeout" in missing[0]["error"]
    assert held, "the real bindings did connect to the silent schedd"
    assert counts(groups)[("AWS_US_EAST_1", 1)] == (30, 0, 30)
    srv.close()
