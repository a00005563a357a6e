"""Planning across cycles in whole DAG runs: the factory's status feeds the frontend's next plan."""

from __future__ import annotations

import pytest

from airflow_glidein import report
from tests.helpers import example_config, run_dag, task_states, write_config, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_booting_pilots_count_before_new_ones_are_asked_for(ec2, tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"]["retry_delay"] = 0
    write_config(tmp_path, cfg, monkeypatch)
    first = xcom(run_dag("glidein_frontend_cms"), "plan_pilots")
    assert {e: p["idle"] for e, p in first["entries"].items()} == {"aws-us-east-1": 13, "aws-us-west-2": 6}
    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)  # east 10 (entry max_idle), west 5 booting

    second = xcom(run_dag("glidein_frontend_cms"), "plan_pilots")
    east, west = second["entries"]["aws-us-east-1"], second["entries"]["aws-us-west-2"]
    # east: 13 wanted, 10 booting -> 3 missing; 10 >= curb_idle_per_entry 5 halves it -> 1; level 10 + 1
    assert east["why"]["pilots"]["booting"] == 10
    assert (east["why"]["wanted"], east["why"]["add"], east["idle"]) == (13, 1, 11)
    assert east["why"]["bound_by"] == "curb_idle_per_entry"
    # west: 6 wanted, 5 booting -> 1 missing; halved to 0.5, but never below one -> level 6
    assert (west["why"]["add"], west["idle"]) == (1, 6)
    table = report.plan_table(second)
    assert "10/0/0" in table and "curb_idle_per_entry (10 >= 5: halved)" in table

    fa = run_dag("glidein_factory")
    work = xcom(fa, "plan_cycle")
    # the factory subtracts what boots: east asks 11 - 10 = 1 and west 6 - 5 = 1, but both entries'
    # max_idle (10 and 5) are full: nothing is launched
    assert work == []
    assert len(ec2.instances("us-east-1")) == 10 and len(ec2.instances("us-west-2")) == 5


def test_a_stale_factory_status_is_not_trusted(ec2, tmp_path, monkeypatch):
    cfg = example_config()
    cfg["factory"]["retry_delay"] = 0
    cfg["frontends"][0]["request_ttl"] = 60
    write_config(tmp_path, cfg, monkeypatch)
    run_dag("glidein_frontend_cms")
    run_dag("glidein_factory")  # 15 pilots booting, in a status event
    from airflow_glidein.operators import PlanPilotsOperator

    real_now = PlanPilotsOperator.now
    monkeypatch.setattr(PlanPilotsOperator, "now", lambda self: real_now(self) + 3600)  # an hour later
    plan = xcom(run_dag("glidein_frontend_cms"), "plan_pilots")
    east = plan["entries"]["aws-us-east-1"]
    assert east["why"]["pilots"]["booting"] == 0 and east["idle"] == 13
