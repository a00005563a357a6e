"""Exactly once and never lost, with the clouds as they are: DAG runs of the real factory.

A cleared run launches what is missing; failures turn the run red with one
ERROR line per failed entry; Airflow's retries of one failed launch back the
entry off once; a termination the provider started and left stalled climbs
the same escalation ladder as ours; pilots of an entry taken out of the
configuration are still listed (with its last settings and connection) and
drained.
"""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest

from airflow_glidein import pilotdb, state
from airflow_glidein import pilots as P
from airflow_glidein.config import ConfigError, parse_config
from airflow_glidein.hooks.ec2 import EC2PilotHook
from tests.helpers import (
    Clock,
    clear_run,
    entry_down,
    example_config,
    idle_jobs,
    run_dag,
    task_states,
    write_config,
    write_queue,
    xcom,
)

pytestmark = pytest.mark.usefixtures("airflow_db")
EAST = "aws-us-east-1"


def one_entry(tmp_path, monkeypatch, pilots=6, batch=2, retries=0, **entry):
    """The example factory with one EC2 entry, asked for ``pilots`` pilots in batches of ``batch``."""
    cfg = example_config()
    cfg["factory"].update(retries=retries, retry_delay=0, verify_timeout=2, verify_poll=1)
    cfg["entries"] = [{**cfg["entries"][0], **entry}]
    cfg["entries"][0]["limits"] = {"max_pilots": 40, "max_idle": 30, "max_per_cycle": 20, "batch_size": batch}
    fe = cfg["frontends"][0]
    fe.update(entries=[EAST], request_ttl=100000)
    fe["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(pilots, "AWS_US_EAST_1", cpus=4))
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


def rows(entry=EAST):
    return {r["id"]: r for r in pilotdb.load_pilots(state.store(), [entry]).values()}


def test_a_cleared_run_launches_exactly_what_is_missing(ec2, tmp_path, monkeypatch):
    """The first try made batch 0 (2 of 6) and died. Cleared, the run re-plans a deficit of 4: a new plan,
    so new launch ids (the old numbering found its batch 0 made and created nothing: 4 of 6)."""
    one_entry(tmp_path, monkeypatch)
    run_dag("glidein_frontend_cms")
    from airflow_glidein.hooks.base import PilotHook

    real = PilotHook.launch
    calls = []

    def dies_before_the_second_batch(self, spec, record=None):
        calls.append(spec.launch_id)
        if len(calls) == 2:  # the worker died between the two provider calls
            raise RuntimeError("worker lost")
        return real(self, spec, record)

    monkeypatch.setattr(PilotHook, "launch", dies_before_the_second_batch)
    first = run_dag("glidein_factory")
    assert str(first.state) == "failed" and len(ec2.instances()) == 2
    monkeypatch.setattr(PilotHook, "launch", real)
    again = clear_run("glidein_factory", first.run_id)
    assert str(again.state) == "success", task_states(again)
    assert len(ec2.instances()) == 6  # the planned count, no more
    made = {}
    for inst in ec2.instances():
        made.setdefault(inst["TagMap"][P.TAG_LAUNCH], 0)
        made[inst["TagMap"][P.TAG_LAUNCH]] += 1
    assert calls[0] in made and made[calls[0]] == 2 and calls[1] not in made
    # a re-run of the same plan reuses its launch ids: nothing more
    same = clear_run("glidein_factory", first.run_id)
    assert str(same.state) == "success" and len(ec2.instances()) == 6


def test_a_lost_create_answer_is_not_repeated_while_the_listing_may_lag(ec2_compat, tmp_path, monkeypatch):
    """The create call made the instances but its answer never came; the listing lags 60 s behind and the
    endpoint ignores ClientToken (as moto and many EC2-compatible clouds do). Until listing_grace has
    passed the retry creates nothing (and says why); the run is red, naming the first cause."""
    clock = Clock(monkeypatch, frozen=True)
    ec2_compat.clock = clock.time
    ec2_compat.set(lag=60, client_token="ignore")
    one_entry(tmp_path, monkeypatch, pilots=2, batch=2, retries=1, listing_grace=600)
    run_dag("glidein_frontend_cms")
    real_create = EC2PilotHook._create

    def lost(self, spec, count, tags):
        real_create(self, spec, count, tags)
        raise ConnectionResetError("the answer to RunInstances never came")

    monkeypatch.setattr(EC2PilotHook, "_create", lost)
    run = run_dag("glidein_factory")
    assert str(run.state) == "failed" and len(ec2_compat.instances()) == 2  # the retry made none
    failures = xcom(run, "report")["failures"]
    assert [(f["entry"], f["call"]) for f in failures] == [(EAST, "launch")]
    assert "never came" in failures[0]["message"]  # the cause, not the retry's wait
    # the next cycle, still within the lag: the two count as capacity (unlisted), nothing is launched
    monkeypatch.setattr(EC2PilotHook, "_create", real_create)
    clock.offset = 30
    again = run_dag("glidein_factory")
    assert xcom(again, "plan_cycle") == [] and len(ec2_compat.instances()) == 2
    assert xcom(again, "report")["pilots"][EAST]["cms"]["requested"] == 2
    clock.offset = 61  # listed at last: the same two, booting
    run_dag("glidein_factory")
    assert {r["state"] for r in rows().values()} == {P.BOOTING} and len(ec2_compat.instances()) == 2


def test_failures_turn_the_run_red_with_one_error_line_each(ec2, tmp_path, monkeypatch, capfd):
    """A bad image at one entry, an unreachable endpoint at the other: both named, the run red, the
    status still published."""
    cfg = example_config()
    cfg["factory"].update(retries=0, retry_delay=0)
    cfg["entries"][0]["image"] = "ami-00000000000000bad"
    cfg["credentials"].append({"id": "aws-down", "type": "ec2_key_pair", "conn_id": "glidein_aws_down",
                               "trust_domain": "aws-west", "purpose": "provision"})
    cfg["credentials"].append({**next(c for c in cfg["credentials"] if c["purpose"] == "pilot"),
                               "id": "pool-west", "trust_domain": "aws-west"})
    cfg["entries"][1]["trust_domain"] = "aws-west"
    cfg["frontends"][0]["credentials"] += ["aws-down", "pool-west"]
    write_config(tmp_path, cfg, monkeypatch)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = json.loads(ec2.connection_json("us-west-2"))
    down["extra"]["endpoint_url"] = f"http://127.0.0.1:{closed}"
    down["extra"]["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_AWS_DOWN", json.dumps(down))
    from moto import settings

    monkeypatch.setattr(settings, "ENABLE_AMI_VALIDATION", True)  # moto checks the image, as EC2 does
    run_dag("glidein_frontend_cms")
    capfd.readouterr()
    run = run_dag("glidein_factory")
    states = task_states(run)
    assert str(run.state) == "failed" and states["report"] == "success" and states["check_cycle"] == "failed"
    failed = {(f["entry"], f["call"]): f["message"] for f in xcom(run, "report")["failures"]}
    assert set(failed) == {(EAST, "launch"), ("aws-us-west-2", "listing")}
    assert "InvalidAMIID.NotFound" in failed[(EAST, "launch")] and "RunInstances" in failed[(EAST, "launch")]
    assert "ami-00000000000000bad" in failed[(EAST, "launch")]
    assert "EndpointConnectionError" in failed[("aws-us-west-2", "listing")]
    assert "glidein_aws_down" in failed[("aws-us-west-2", "listing")]
    errors = [line for line in capfd.readouterr().out.splitlines() if "[error" in line and "CycleCheck" in line]
    assert len(errors) == 2  # one line per failed entry and call, each naming both
    assert any(f"Entry {EAST}: launch failed: launch " in e and "InvalidAMIID.NotFound" in e for e in errors)
    assert any("Entry aws-us-west-2: listing failed: listing with connection glidein_aws_down: "
               "EndpointConnectionError" in e for e in errors)
    # the listing failure blocks launches at that entry this cycle only: it is not a timed backoff
    why = xcom(run, "plan_cycle", key="decisions")["aws-us-west-2"]
    assert why["bound_by"].startswith("listing failed this cycle") and "backoff" not in why["bound_by"]


def test_a_region_the_provider_does_not_have_is_refused_at_check_config():
    cfg = example_config()
    cfg["entries"][0]["region"] = "us-east-7"
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, "glidein.yaml")
    assert str(err.value) == ("glidein.yaml: entries[aws-us-east-1]: region is not an AWS region botocore knows "
                              "for EC2 (for an EC2-compatible cloud, name its endpoint; for a region newer than "
                              "botocore, upgrade it)")
    cfg["entries"][0]["endpoint"] = "euca-site"  # an EC2-compatible cloud names its own regions
    parse_config(cfg, "glidein.yaml")


def test_airflow_retries_of_one_failed_launch_back_the_entry_off_once(ec2, tmp_path, monkeypatch):
    one_entry(tmp_path, monkeypatch, retries=2)
    run_dag("glidein_frontend_cms")
    from botocore.exceptions import ClientError

    refusal = ClientError({"Error": {"Code": "InstanceLimitExceeded", "Message": "vCPU limit reached"},
                           "ResponseMetadata": {"HTTPStatusCode": 400}}, "RunInstances")
    entry_down(monkeypatch, EAST, error=refusal)
    clock = Clock(monkeypatch)
    run = run_dag("glidein_factory")
    assert task_states(run)["ec2-us-east-1.submit_pilots[0]"] == "failed"
    health = pilotdb.load_health(state.store())[EAST]
    assert health["failures"] == 1  # three tries, one failed cycle
    assert 0 < health["until"] - clock.now() <= 60
    clock.offset = 61  # the next cycle fails again: now it doubles
    run_dag("glidein_factory")
    health = pilotdb.load_health(state.store())[EAST]
    assert health["failures"] == 2 and 60 < health["until"] - clock.now() <= 120


def shutting_down(ec2, ids, region="us-east-1"):
    """Put instances into EC2's shutting-down state and keep them there (moto has no API for a stall)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    for iid in ids:
        inst = backend.get_instance(iid)
        inst._state.name, inst._state.code = "shutting-down", 32


def test_a_termination_the_provider_started_and_left_stalled_is_escalated(ec2, tmp_path, monkeypatch):
    """EC2 put two pilots in shutting-down by itself (not asked) and they stay there. Today's main skipped
    them forever; they get the entry's terminate_deadline, then terminate, again, force, stuck."""
    one_entry(tmp_path, monkeypatch, pilots=2, policy={"terminate_deadline": 120, "max_lifetime": 86400})
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    ids = sorted(i["InstanceId"] for i in ec2.instances())
    shutting_down(ec2, ids)

    def rows():  # these two (the factory launches replacements: terminating pilots are no capacity)
        return {i: r for i, r in globals()["rows"]().items() if i in ids}

    calls = []
    monkeypatch.setattr(EC2PilotHook, "_terminate", lambda self, ids: calls.append(("terminate", sorted(ids))))
    monkeypatch.setattr(EC2PilotHook, "_force_terminate", lambda self, ids: calls.append(("force", sorted(ids))))
    clock = Clock(monkeypatch)
    run_dag("glidein_factory")  # first seen terminating: the deadline starts now
    assert {r["state"] for r in rows().values()} == {P.TERMINATING} and calls == []
    assert {r["memory"]["terminate_reason"] for r in rows().values()} == {
        "the provider is terminating it (not asked by the factory)"}
    for step in (1, 2, 3):
        clock.offset = step * 121
        run_dag("glidein_factory")
    assert [c[0] for c in calls] == ["terminate", "terminate", "force"] and all(c[1] == ids for c in calls)
    clock.offset = 4 * 121
    last = run_dag("glidein_factory")
    assert {r["state"] for r in rows().values()} == {P.STUCK}
    assert xcom(last, "report")["stuck"] == [P.pilot_key(EAST, i) for i in ids]


def test_pilots_of_a_removed_entry_are_still_listed_through_their_connection_and_drained(
        ec2, nova, tmp_path, monkeypatch):
    """OpenStack lists by entry tag: once an entry left the configuration, nothing listed its pilots
    (they were forgotten, still running). Its last settings and connection keep them in sight."""
    from tests.test_e2e_multicloud import multicloud_config

    cfg = only_entry(multicloud_config(write_queue(tmp_path, idle_jobs(3, "CERN", cpus=4))), "cern-openstack")
    cfg["factory"].update(retries=0, verify_timeout=2, verify_poll=1)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    servers = {s["id"] for s in nova.live()}
    assert len(servers) == 3
    cfg["entries"] = [{**cfg["entries"][0], "name": "cern-other"}]  # the entry leaves; another takes its place
    cfg["frontends"][0]["entries"] = ["cern-other"]
    write_config(tmp_path, cfg, monkeypatch)
    clock = Clock(monkeypatch)
    run = run_dag("glidein_factory")
    assert str(run.state) == "success", task_states(run)
    kept = rows("cern-openstack")
    assert set(kept) == servers and {r["state"] for r in kept.values()} == {P.ORPHAN}
    assert all("no longer configured" in r["detail"] for r in kept.values())
    assert xcom(run, "report")["pilots"]["cern-openstack"]["cms"]["orphan"] == 3
    clock.offset = 901  # never registered (no collector here): drained once past their boot timeout
    run = run_dag("glidein_factory")
    actions = xcom(run, "plan_cycle", key="actions")
    assert {(a["entry"], a["id"]) for a in actions} == {("cern-openstack", s) for s in servers}
    assert {s["id"] for s in nova.live()} == set()
    run_dag("glidein_factory")
    assert rows("cern-openstack") == {}  # all gone: the entry is forgotten
    assert pilotdb.load_snapshots(state.store(), ["cern-openstack"]) == {}


def lagging(middleware, request, clock, lag):
    """The middleware's test cloud with a listing lag of ``lag`` s on the test's clock; (entry, server)."""
    if middleware == "ec2":
        server = request.getfixturevalue("ec2_compat")
        server.clock = clock.time
        server.set(lag=lag)
        return "aws-us-east-1", server
    server = request.getfixturevalue("nova" if middleware == "openstack" else "one")
    server.clock, server.lag = clock, lag
    return ("cern-openstack" if middleware == "openstack" else "fermicloud"), server


def only_entry(cfg, name):
    """The multicloud config cut down to one entry, its credentials and a frontend of it."""
    entry = next(e for e in cfg["entries"] if e["name"] == name)
    creds = [c for c in cfg["credentials"] if c["trust_domain"] == entry["trust_domain"]]
    cfg["entries"], cfg["credentials"] = [entry], creds
    cfg["frontends"][0].update(entries=[name], credentials=[c["id"] for c in creds])
    return cfg


def made_per_launch(middleware, server):
    """Instances the cloud holds per launch id (what it really made, listed or not)."""
    if middleware == "ec2":
        return Counter(i["TagMap"][P.TAG_LAUNCH] for i in server.instances(live_only=False))
    if middleware == "openstack":
        return Counter(s["metadata"].get(P.TAG_LAUNCH) for s in server.servers.values())
    return Counter(vm["USER_TEMPLATE"].get("GLIDEIN_LAUNCH") for vm in server.vms.values())


@pytest.mark.parametrize("middleware", ["ec2", "openstack", "opennebula"])
def test_back_to_back_factory_runs_under_listing_lag_make_no_duplicate(middleware, request, tmp_path, monkeypatch):
    """30 s of listing lag: every run within it sees none of the pilots the first run made. They are
    recorded at create (Nova's batch call names its first server only: the launch's expected count
    covers the rest), count as capacity, and are launched once."""
    from tests.test_e2e_multicloud import multicloud_config

    request.getfixturevalue("ec2")
    clock = Clock(monkeypatch, frozen=True)
    entry, server = lagging(middleware, request, clock, lag=30)
    site = {"aws-us-east-1": "AWS_US_EAST_1", "cern-openstack": "CERN", "fermicloud": "FERMICLOUD"}[entry]
    cfg = only_entry(multicloud_config(write_queue(tmp_path, idle_jobs(6, site, cpus=4))), entry)
    cfg["factory"].update(retries=0)
    cfg["frontends"][0]["request_ttl"] = 100000
    cfg["entries"][0]["limits"]["batch_size"] = 2
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    planned = {}
    for offset in (0, 5, 10, 20):  # back to back, all inside the lag
        clock.offset = offset
        run = run_dag("glidein_factory")
        assert str(run.state) == "success", task_states(run)
        planned.update({b["launch_id"]: b["count"] for w in xcom(run, "plan_cycle") for b in w["launches"]})
        assert xcom(run, "report")["pilots"][entry]["cms"]["requested"] == 6
    made = made_per_launch(middleware, server)
    assert sum(made.values()) == 6 and all(made[lid] == n for lid, n in planned.items()), (made, planned)
    clock.offset = 31  # the listing caught up: the same six, booting
    run = run_dag("glidein_factory")
    assert xcom(run, "plan_cycle") == [] and sum(made_per_launch(middleware, server).values()) == 6
    assert xcom(run, "report")["pilots"][entry]["cms"] == {"booting": 6, "total": 6}


def test_two_opennebula_endpoints_with_colliding_vm_ids_are_tracked_and_reaped_apart(one_pair, tmp_path,
                                                                                        monkeypatch):
    """Both oned endpoints number VMs from 0: VM 0 at one-a is not VM 0 at one-b. Each pilot is tracked
    and reaped at its own endpoint, and nothing is launched again (today: 12 VMs for 6 jobs)."""
    from tests.test_e2e_multicloud import multicloud_config

    jobs = idle_jobs(3, "ONE_A", cpus=4) + idle_jobs(3, "ONE_B", cpus=4, start=2)
    cfg = multicloud_config(write_queue(tmp_path, jobs))
    cfg["factory"].update(retries=0, verify_timeout=2, verify_poll=1)
    cfg["entries"] = [{**e, "limits": {"max_pilots": 10, "max_idle": 10, "max_per_cycle": 10, "batch_size": 3},
                       "policy": {"max_lifetime": 3600}} for e in one_pair.entries]
    cfg["credentials"] = one_pair.credentials
    cfg["frontends"][0].update(entries=one_pair.entry_names, credentials=one_pair.credential_ids,
                               request_ttl=100000)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    for _ in range(2):  # the second run finds every pilot: nothing more
        run = run_dag("glidein_factory")
        assert str(run.state) == "success", task_states(run)
    a, b = one_pair.servers
    assert sorted(a.vms) == sorted(b.vms) == [0, 1, 2]  # the same ids at both endpoints
    table = pilotdb.load_pilots(state.store())
    assert set(table) == {f"{e}/{i}" for e in one_pair.entry_names for i in (0, 1, 2)}
    assert {(r["entry"], r["conn"]) for r in table.values()} == set(zip(one_pair.entry_names, one_pair.conn_ids))
    # one-a's pilots reach their end of life: reaped at one-a only, through one-a's connection
    for vm in a.vms.values():
        vm["STIME"] -= 7200
    run = run_dag("glidein_factory")
    actions = xcom(run, "plan_cycle", key="actions")
    assert {(x["entry"], x["id"]) for x in actions} == {("one-a", str(i)) for i in (0, 1, 2)}
    assert all(vm["ID"] >= 3 for vm in a.live())  # 0-2 gone (replacements, if any, are new VMs)
    assert sorted(vm["ID"] for vm in b.live()) == [0, 1, 2]  # one-b's VM 0 was not touched


def test_two_schedds_with_colliding_job_ids_are_tracked_apart(schedd_pair, tmp_path, monkeypatch):
    """Both schedds number clusters from 1: job 1.0 at grid-a is not job 1.0 at grid-b."""
    from tests.test_e2e_multicloud import multicloud_config

    jobs = idle_jobs(2, "GRID_A", cpus=8) + idle_jobs(2, "GRID_B", cpus=8, start=2)
    cfg = multicloud_config(write_queue(tmp_path, jobs))
    cfg["factory"].update(retries=0)
    cfg["entries"] = [{**e, "limits": {"max_pilots": 10, "max_idle": 10, "max_per_cycle": 10, "batch_size": 2}}
                      for e in schedd_pair.entries]
    cfg["credentials"] = schedd_pair.credentials
    cfg["frontends"][0].update(entries=schedd_pair.entry_names, credentials=schedd_pair.credential_ids,
                               request_ttl=100000)
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    for _ in range(2):
        run = run_dag("glidein_factory")
        assert str(run.state) == "success", task_states(run)
    table = pilotdb.load_pilots(state.store())
    assert set(table) == {f"{e}/1.{p}" for e in schedd_pair.entry_names for p in (0, 1)}
    assert [len(s.jobs) for s in schedd_pair.servers] == [2, 2]  # launched once at each
