"""glidein_burst: manual bursts with params, valid and invalid, reaped by their own policy."""

from __future__ import annotations

from collections import Counter

import pytest
from airflow.sdk.exceptions import ParamValidationError

from airflow_glidein import pilots as P
from tests.helpers import DAGS, entry_down, example_config, run_dag, task_states, write_config, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def cfg(ec2, tmp_path, monkeypatch):
    data = example_config()
    data["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    data["entries"][1]["allow_vo_image"] = True
    data["frontends"][0]["request_ttl"] = 100000
    write_config(tmp_path, data, monkeypatch)
    return data


def burst(**params):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS)).get_dag("glidein_burst").test(run_conf=params)


def test_burst_launches_its_pilots_tagged_and_counted_apart(cfg, ec2):
    run = burst(frontend="cms", entries=["aws-us-east-1"], pilots=3, lifetime_hours=2, idle_timeout_minutes=10)
    assert str(run.state) == "success", task_states(run)
    request = xcom(run, "plan_burst")
    assert request["entries"]["aws-us-east-1"]["idle"] == 3 and request["ttl"] == 7200
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    inst = ec2.instances("us-east-1")
    assert len(inst) == 3
    tags = inst[0]["TagMap"]
    assert tags[P.TAG_BURST] == request["burst"] and tags[P.TAG_FRONTEND] == "cms"
    assert tags[P.TAG_MAX_LIFETIME] == "7200" and tags[P.TAG_IDLE_TIMEOUT] == "600"
    # the frontend's own request (13) is provisioned beside the burst, not counted against it; the
    # entry's max_idle (10) holds across both
    run_dag("glidein_frontend_cms")
    fa = run_dag("glidein_factory")
    per = Counter(i["TagMap"].get(P.TAG_BURST, "cms") for i in ec2.instances("us-east-1"))
    assert per == {request["burst"]: 3, "cms": 7}
    assert next(w for w in xcom(fa, "plan_cycle") if w["entry"] == "aws-us-east-1")["why"]["bound_by"] == "entry.max_idle"
    # a second factory run does not launch the burst again
    run_dag("glidein_factory")
    assert Counter(i["TagMap"].get(P.TAG_BURST, "cms") for i in ec2.instances("us-east-1"))[request["burst"]] == 3
    # past the burst's own lifetime (2 h, under the entry's 12 h), the factory reaps them like any others
    burst_ids = [i["InstanceId"] for i in ec2.instances("us-east-1") if P.TAG_BURST in i["TagMap"]]
    ec2.age(burst_ids, 3 * 3600)
    fa = run_dag("glidein_factory")
    actions = xcom(fa, "plan_cycle", key="actions")
    assert sorted(a["id"] for a in actions) == sorted(burst_ids)
    assert all("max_lifetime (" in a["reason"] and "> 7200 s" in a["reason"] for a in actions)


def test_cores_are_turned_into_pilots_per_entry(cfg, ec2):
    run = burst(frontend="cms", cores=40)  # both entries: 20 cores each, 4-core and 8-core pilots
    assert str(run.state) == "success", task_states(run)
    entries = xcom(run, "plan_burst")["entries"]
    assert {e: p["idle"] for e, p in entries.items()} == {"aws-us-east-1": 5, "aws-us-west-2": 3}


def test_vo_image_where_allowed(cfg, ec2):
    run = burst(frontend="cms", entries=["aws-us-west-2"], pilots=2, vo_image="ami-cms0001")
    assert str(run.state) == "success", task_states(run)
    run_dag("glidein_factory")
    assert {i["ImageId"] for i in ec2.instances("us-west-2")} == {"ami-cms0001"}


def test_dry_run_publishes_nothing(cfg, ec2):
    run = burst(frontend="cms", pilots=4, dry_run=True)
    states = task_states(run)
    assert states["plan_burst"] == "success" and states["publish_request"] == "skipped"
    assert sum(p["idle"] for p in xcom(run, "plan_burst")["entries"].values()) == 4
    run_dag("glidein_factory")
    assert ec2.instances("us-east-1") == [] and ec2.instances("us-west-2") == []


@pytest.mark.parametrize("params, message", [
    ({"frontend": "cms", "entries": ["gcp-europe"], "pilots": 2}, "is not one of"),
    ({"frontend": "atlas", "pilots": 2}, "is not one of ['cms']"),
    ({"frontend": "cms", "pilots": 0}, "0 is less than the minimum of 1"),
    ({"frontend": "cms", "pilots": 2, "lifetime_hours": -1}, "less than or equal to the minimum of 0"),
])
def test_params_refused_by_the_form_schema(cfg, params, message):
    with pytest.raises(ParamValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        burst(**params)


@pytest.mark.parametrize("params, message", [
    ({"frontend": "cms", "pilots": 2, "cores": 8}, "give either a number of pilots or a number of cores"),
    ({"frontend": "cms"}, "give either a number of pilots or a number of cores"),
    ({"frontend": "cms", "pilots": 2, "lifetime_hours": 24}, "lifetime 24 h exceeds entry aws-us-east-1's max_lifetime (12 h)"),
    ({"frontend": "cms", "pilots": 2, "lifetime_hours": 0.05}, "lifetime_hours must be at least 10 minutes"),
    ({"frontend": "cms", "entries": ["aws-us-east-1"], "pilots": 2, "vo_image": "ami-x"},
     "entry aws-us-east-1 does not allow a VO image"),
])
def test_params_refused_against_the_configuration(cfg, ec2, params, message, capfd):
    run = burst(**params)
    states = task_states(run)
    assert str(run.state) == "failed" and states["validate_params"] == "failed", states
    assert states["publish_request"] != "success"
    out, err = capfd.readouterr()  # dag.test runs the task here; its log goes to this process
    assert f"invalid burst: " in out + err and message in out + err
    run_dag("glidein_factory")
    assert ec2.instances("us-east-1") == [] and ec2.instances("us-west-2") == []


def test_a_backed_off_entry_is_left_out_of_a_burst(cfg, ec2, monkeypatch, capfd):
    entry_down(monkeypatch, "aws-us-west-2")
    run_dag("glidein_frontend_cms")
    fa = run_dag("glidein_factory")
    assert "aws-us-west-2" in xcom(fa, "report")["backoff"]

    # the burst's pilots go where they can start now; the plan says why west got none
    run = burst(frontend="cms", pilots=4)
    assert str(run.state) == "success", task_states(run)
    request = xcom(run, "plan_burst")
    assert {e: p["idle"] for e, p in request["entries"].items()} == {"aws-us-east-1": 4}
    assert request["skipped"]["aws-us-west-2"].startswith("entry backed off by the factory for another ")
    assert "ConnectionError" in request["skipped"]["aws-us-west-2"]

    # a burst only onto the backed-off entry fails, saying so, and publishes nothing
    capfd.readouterr()
    run = burst(frontend="cms", entries=["aws-us-west-2"], pilots=2)
    states = task_states(run)
    assert states["plan_burst"] == "failed" and states["publish_request"] == "upstream_failed"
    out, err = capfd.readouterr()
    assert "no entry can take it: {'aws-us-west-2': 'entry backed off by the factory" in out + err
    requests = xcom(run_dag("glidein_factory"), "collect_requests")
    assert [k for k in requests if k.startswith("burst-")] == ["burst-" + request["burst"]]
