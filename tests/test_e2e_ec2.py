"""Whole DAG runs: frontend then factory, against moto's EC2 server on 127.0.0.1."""

from __future__ import annotations

import pytest

from airflow_glidein.userdata import parse as parse_userdata
from tests.helpers import example_config, run_dag, task_states, write_config, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_frontend_then_factory_launches_planned_pilots(ec2, tmp_path, monkeypatch):
    write_config(tmp_path, example_config(), monkeypatch)
    fe = run_dag("glidein_frontend_cms")
    assert str(fe.state) == "success", task_states(fe)
    request = xcom(fe, "plan_pilots")
    assert request["entries"]["aws-us-east-1"]["idle"] == 13
    assert request["entries"]["aws-us-west-2"]["idle"] == 6

    fa = run_dag("glidein_factory")
    assert str(fa.state) == "success", task_states(fa)
    east = ec2.instances("us-east-1")
    west = ec2.instances("us-west-2")
    print(len(east), len(west))
