"""One Airflow pool per provider API endpoint: created from the config, used by every factory task that calls it."""

from __future__ import annotations

import pytest

from airflow_glidein.cli import main
from airflow_glidein.config import pool_name
from tests.helpers import DAGS, example_config, write_config

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def cfg_path(tmp_path, monkeypatch):
    cfg = example_config()
    cfg["entries"][0]["api_budget"] = {"requests": 100, "per_seconds": 60, "concurrency": 2}
    third = dict(cfg["entries"][0], name="aws-us-east-1-big", flavor="c5.4xlarge", cores=16)
    third["api_budget"] = {"concurrency": 3}
    cfg["entries"].append(third)  # same region: the same endpoint, pool and budget
    return write_config(tmp_path, cfg, monkeypatch)


def test_sync_pools_creates_one_pool_per_endpoint(cfg_path, capsys):
    from airflow.models.pool import Pool

    assert main(["sync-pools", str(cfg_path)]) == 0
    pools = {p.pool: p for p in Pool.get_pools()}
    assert pools["glidein_ec2-us-east-1"].slots == 3  # the largest concurrency of the endpoint's entries
    assert pools["glidein_ec2-us-west-2"].slots == 4
    assert "aws-us-east-1, aws-us-east-1-big" in pools["glidein_ec2-us-east-1"].description
    assert "glidein_ec2-us-east-1  3" in capsys.readouterr().out
    # running it again resizes, does not duplicate
    assert main(["sync-pools", str(cfg_path)]) == 0
    assert sum(p.pool.startswith("glidein_") for p in Pool.get_pools()) == 2


def test_every_task_calling_an_endpoint_runs_in_its_pool(cfg_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS)).dags["glidein_factory"]
    calling = {"inventory", "submit_pilots", "reap_pilots", "verify_terminations"}
    seen = set()
    for task_id, task in dag.task_dict.items():
        group, _, name = task_id.rpartition(".")
        if name in calling:
            assert task.pool == pool_name(group), task_id
            seen.add((group, name))
        else:  # tasks that call no provider stay out of the endpoint pools
            assert not task.pool.startswith("glidein_"), task_id
    assert seen == {(g, n) for g in ("ec2-us-east-1", "ec2-us-west-2") for n in calling}
    inv = dag.task_dict["ec2-us-east-1.inventory"]
    assert inv.entries == ["aws-us-east-1", "aws-us-east-1-big"]


def test_sync_pools_refuses_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("factory: {}\n")
    assert main(["sync-pools", str(bad)]) == 1
    assert "factory.name: required field is missing" in capsys.readouterr().err


def test_inventory_lists_an_endpoint_once_for_all_its_entries(ec2, cfg_path, state_store):
    """Entries in one region with one connection: one listing pass, pilots split by their entry tag."""
    from sqlalchemy import func, select

    from airflow_glidein import pilotdb, state
    from airflow_glidein.budget import SPENT
    from airflow_glidein.operators import InventoryOperator

    c = ec2.client()
    for entry, n in (("aws-us-east-1", 3), ("aws-us-east-1-big", 2), ("gone-entry", 1)):
        c.run_instances(ImageId="ami-1", InstanceType="c5.xlarge", MinCount=n, MaxCount=n, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "glidein:factory", "Value": "demo-factory"},
                                                  {"Key": "glidein:entry", "Value": entry},
                                                  {"Key": "glidein:frontend", "Value": "cms"}]}])

    def tokens():
        with state.store().begin() as conn:
            return conn.execute(select(func.count()).where(SPENT.c.endpoint == "ec2-us-east-1")).scalar_one()

    before = tokens()
    inv = InventoryOperator(task_id="inventory", entries=["aws-us-east-1", "aws-us-east-1-big"],
                            config_file=str(cfg_path)).execute({"run_id": "factory-run-1"})
    assert tokens() - before == 1  # one DescribeInstances for both entries
    # the pilot of an entry no longer configured is an orphan of its own entry, found by the region's listing
    assert inv["counts"] == {"aws-us-east-1": {"cms": {"booting": 3, "total": 3}},
                             "aws-us-east-1-big": {"cms": {"booting": 2, "total": 2}},
                             "gone-entry": {"cms": {"orphan": 1, "total": 1}}}
    assert inv["removed"] == ["gone-entry"]
    rows = pilotdb.load_pilots(state.store())
    assert sorted(r["entry"] for r in rows.values()) == ["aws-us-east-1"] * 3 + ["aws-us-east-1-big"] * 2 + [
        "gone-entry"]
    assert [r["detail"] for r in rows.values() if r["state"] == "orphan"] == [
        "entry 'gone-entry' is no longer configured"]
