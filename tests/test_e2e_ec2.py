"""Whole DAG runs: frontend then factory, against moto's EC2 server on 127.0.0.1."""

from __future__ import annotations

import base64
from collections import Counter

import pytest

from airflow_glidein import pilots as P
from airflow_glidein.hooks.ec2 import EC2PilotHook
from airflow_glidein.userdata import parse as parse_userdata
from tests.helpers import (
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


def fast(cfg: dict) -> dict:
    cfg["factory"]["retry_delay"] = 0
    return cfg


def by_launch(instances: list[dict]) -> Counter:
    return Counter(i["TagMap"][P.TAG_LAUNCH] for i in instances)


def test_frontend_then_factory_launches_planned_pilots(ec2, tmp_path, monkeypatch):
    write_config(tmp_path, fast(example_config()), monkeypatch)
    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success", task_states(fe)
    request = xcom(fe, "plan_pilots")
    # east: 30 one-core jobs + half of 24 shared one-core + half of 4 shared 4-core = 50 cores / 4 per pilot
    assert request["entries"]["aws-us-east-1"]["idle"] == 13
    # west: 3 eight-core + 12 one-core + 2 four-core = 44 cores / 8 per pilot
    assert request["entries"]["aws-us-west-2"]["idle"] == 6

    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    east, west = ec2.instances("us-east-1"), ec2.instances("us-west-2")
    # east is bound by the entry's max_idle (10), in batches of 5; west by its max_idle (5)
    assert len(east) == 10 and len(west) == 5
    assert {i["InstanceType"] for i in east} == {"c5.xlarge"}
    assert {i["InstanceType"] for i in west} == {"m5.2xlarge"}
    assert sorted(by_launch(east).values()) == [5, 5]
    for inst, entry in [(i, "aws-us-east-1") for i in east] + [(i, "aws-us-west-2") for i in west]:
        tags = inst["TagMap"]
        assert tags[P.TAG_FACTORY] == "demo-factory"
        assert tags[P.TAG_FRONTEND] == "cms"
        assert tags[P.TAG_ENTRY] == entry
        assert tags[P.TAG_REQUEST] == fe.run_id
        assert tags[P.TAG_LAUNCH].endswith(tuple(f".cms.{entry}.{b}" for b in range(2)))
    # the envelope names the launch and carries no credential
    attr = ec2.client().describe_instance_attribute(InstanceId=east[0]["InstanceId"], Attribute="userData")
    raw = base64.b64decode(attr["UserData"]["Value"]).decode()
    envelope = parse_userdata(raw)
    assert envelope["launch_id"] == east[0]["TagMap"][P.TAG_LAUNCH]
    assert envelope["bootstrap_url"] == "http://127.0.0.1:8080/glidein"
    assert "pool-token-value" not in raw and "testing-secret-key" not in raw
    # the factory's report is what frontends read next cycle
    status = xcom(fa, "report")
    assert status["pilots"]["aws-us-east-1"]["cms"]["requested"] == 10


def test_second_factory_run_on_same_request_launches_nothing(ec2, tmp_path, monkeypatch):
    write_config(tmp_path, fast(example_config()), monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    first = {i["InstanceId"] for i in ec2.instances("us-east-1") + ec2.instances("us-west-2")}
    again = run_dag("glidein_factory")
    assert str(again.state) == "success", task_states(again)
    after = {i["InstanceId"] for i in ec2.instances("us-east-1") + ec2.instances("us-west-2")}
    assert after == first
    assert xcom(again, "plan_cycle") == []
    # the inventory of the second run saw the first run's pilots as capacity
    counts = xcom(again, "inventory")["counts"]
    assert counts == {"aws-us-east-1": {"cms": {"booting": 10, "total": 10}},
                      "aws-us-west-2": {"cms": {"booting": 5, "total": 5}}}


def test_submit_failing_after_the_api_call_is_retried_without_duplicates(ec2, tmp_path, monkeypatch):
    write_config(tmp_path, fast(example_config()), monkeypatch)
    run_dag("glidein_frontend_cms")
    real_create = EC2PilotHook._create
    calls = Counter()

    def create_then_crash(self, spec, count, tags):
        made = real_create(self, spec, count, tags)
        calls[spec.launch_id] += 1
        if calls[spec.launch_id] == 1:
            raise ConnectionError("connection reset after RunInstances was accepted")
        return made

    monkeypatch.setattr(EC2PilotHook, "_create", create_then_crash)
    fa = run_dag("glidein_factory")
    states = task_states(fa)
    assert str(fa.state) == "success", states
    east, west = ec2.instances("us-east-1"), ec2.instances("us-west-2")
    # every launch crashed once after its instances were made; the retry made none again
    assert len(east) == 10 and len(west) == 5
    assert all(n == 5 for n in by_launch(east).values())
    assert set(calls.values()) == {1}
    submit = xcom(fa, "submit_pilots", map_index=None)
    assert sum(len(b["existing"]) for item in submit for b in item["launched"]) == 15


def test_two_frontends_share_an_entry_limit(ec2, tmp_path, monkeypatch):
    cfg = fast(example_config())
    east = next(e for e in cfg["entries"] if e["name"] == "aws-us-east-1")
    east["limits"] = {"max_pilots": 7, "max_idle": 7, "max_per_cycle": 20, "batch_size": 10}
    cfg["entries"] = [east]
    queue = write_queue(tmp_path, idle_jobs(40, "AWS_US_EAST_1", cpus=4))
    base = cfg["frontends"][0]
    cfg["frontends"] = [
        {**base, "name": "cms", "entries": ["aws-us-east-1"], "demand": {"queue_file": queue}},
        {**base, "name": "atlas", "entries": ["aws-us-east-1"], "demand": {"queue_file": queue}},
    ]
    write_config(tmp_path, cfg, monkeypatch)
    for fe in ("cms", "atlas"):
        run = run_dag(f"glidein_frontend_{fe}")
        assert xcom(run, "plan_pilots")["entries"]["aws-us-east-1"]["idle"] == 40
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    inst = ec2.instances("us-east-1")
    assert len(inst) == 7
    per_fe = Counter(i["TagMap"][P.TAG_FRONTEND] for i in inst)
    assert sorted(per_fe.values()) == [3, 4]
    work = xcom(fa, "plan_cycle")
    assert work[0]["why"]["bound_by"] == "entry.max_pilots"
    # a second cycle adds nothing: the entry is full
    run_dag("glidein_factory")
    assert len(ec2.instances("us-east-1")) == 7


def test_factory_reaps_pilots_past_max_lifetime_only(ec2, tmp_path, monkeypatch):
    cfg = fast(example_config())
    cfg["entries"] = cfg["entries"][:1]
    cfg["entries"][0]["policy"] = {"max_lifetime": 3600}
    cfg["frontends"][0]["entries"] = ["aws-us-east-1"]
    cfg["frontends"][0]["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(4, "AWS_US_EAST_1", cpus=4))
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    old = {i["InstanceId"] for i in ec2.instances()}
    assert len(old) == 4
    # More demand: the next cycle adds four young pilots.
    cfg["frontends"][0]["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(8, "AWS_US_EAST_1", cpus=4), "q2.json")
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")
    young = {i["InstanceId"] for i in ec2.instances()} - old
    assert len(young) == 4
    # The first four were launched two hours ago (moto has no API to say so; see MotoEC2.age).
    ec2.age(old, 7200)
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    actions = xcom(fa, "plan_cycle", key="actions")
    assert {a["id"] for a in actions} == old
    assert all(a["action"] == "terminate" and "past max_lifetime" in a["reason"] for a in actions)
    assert xcom(fa, "reap_pilots") == [{"entry": "aws-us-east-1", "conn": "glidein_aws_demo", "ids": sorted(old)}]
    assert task_states(fa)["verify_terminations"] == "success"
    assert {i["InstanceId"] for i in ec2.instances()} >= young
    assert not ({i["InstanceId"] for i in ec2.instances()} & old)


def test_one_entry_failing_does_not_stop_the_others(ec2, tmp_path, monkeypatch):
    cfg = fast(example_config())
    cfg["factory"]["retries"] = 1
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    entry_down(monkeypatch, "aws-us-west-2")
    fa = run_dag("glidein_factory")
    states = task_states(fa)
    # one task group per API endpoint (EC2 region): west's submit failed, east's went through
    assert states["ec2-us-west-2.submit_pilots[0]"] == "failed" and states["ec2-us-east-1.submit_pilots[0]"] == "success"
    assert states["reap_pilots"] == "success"
    assert len(ec2.instances("us-east-1")) == 10 and ec2.instances("us-west-2") == []
    # the cycle could not do all its work: the report still published (the failing entry backed off, the
    # failure named), then failed, and the run is red
    assert states["report"] == "success" and states["check_cycle"] == "failed" and str(fa.state) == "failed"
    status = xcom(fa, "report")
    assert "aws-us-west-2" in status["backoff"]
    assert [(f["entry"], f["call"]) for f in status["failures"]] == [("aws-us-west-2", "launch")]
    assert "endpoint unreachable" in status["failures"][0]["message"]


def test_spot_entries_launch_one_time_spot_pilots(ec2, tmp_path, monkeypatch):
    cfg = fast(example_config())
    cfg["entries"][0]["options"] = {"spot": True, "spot_max_price": 0.07}
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    east, west = ec2.instances("us-east-1"), ec2.instances("us-west-2")
    assert len(east) == 10 and {i.get("InstanceLifecycle") for i in east} == {"spot"}
    assert west and all("InstanceLifecycle" not in i for i in west)  # on-demand where the entry says nothing
    # a spot pilot is a pilot like another: a second run counts it and launches nothing more
    again = run_dag("glidein_factory")
    assert xcom(again, "plan_cycle") == [] and len(ec2.instances("us-east-1")) == 10
