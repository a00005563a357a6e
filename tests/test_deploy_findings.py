"""What the soak (tests/soak/) found in the product, each reproduced here.

- A Celery worker runs tasks in prefork pool processes that multiprocessing marks daemonic, and
  Airflow forks the task process from one; a daemonic process may not start multiprocessing
  children. The frontend asks each schedd from a forked child (demand.run_isolated), so under
  Celery every query_demand failed with "daemonic processes are not allowed to have children".
- A submit_pilots task killed with its worker is retried; its launch id counted only the live
  instances it had made, so a pilot of the first try that had already ended (its VM booted, failed
  and powered off in between) was made again: 3 instances for a launch of 2.
- After PostgreSQL restarted, an API server's state store handed out a pooled connection that had
  died with it: the next token exchange answered 500 and its pilot gave up.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile

from airflow_glidein import demand
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.servers.common import signed_envelope


def _answer() -> int:
    return 42


def test_schedd_queries_fork_inside_a_daemonic_worker_process(monkeypatch):
    me = multiprocessing.current_process()
    monkeypatch.setitem(me._config, "daemon", True)  # what billiard's pool process is
    results = demand.run_isolated({"schedd-a": _answer, "schedd-b": _answer}, timeout=60)
    assert results == {"schedd-a": (True, 42), "schedd-b": (True, 42)}
    assert me._config["daemon"] is True  # the mark is back once the children have started


def test_a_retried_launch_does_not_remake_a_pilot_that_already_ended(ec2):
    entry = Entry(name="aws-test", middleware="ec2", region="us-east-1", image="ami-1e749f67", flavor="c5.xlarge",
                  trust_domain="aws")
    env = signed_envelope("ec2", {"factory": "f", "entry": entry.name, "frontend": "cms", "launch_id": "r1.cms.0"})
    spec = LaunchSpec(launch_id="r1.cms.0", frontend="cms", count=2, image=entry.image, userdata=env, request="c1")
    first = pilot_hook(entry, "f", "glidein_aws_test").launch(spec)
    assert len(first["created"]) == 2
    ec2.client().terminate_instances(InstanceIds=first["created"][:1])  # that pilot came and went
    again = pilot_hook(entry, "f", "glidein_aws_test").launch(spec)  # the retry of the same launch
    assert again["created"] == [] and set(again["existing"]) == set(first["created"])  # the ended one counts
    made = [i for i in ec2.instances(live_only=False) if i["TagMap"].get("glidein:launch") == "r1.cms.0"]
    assert len(made) == 2


def test_the_state_store_survives_a_postgresql_restart():
    from sqlalchemy import text

    from airflow_glidein.state import StateStore
    from tests.pg import ThrowawayPostgres, binaries

    if binaries() is None:
        import pytest

        pytest.skip("no PostgreSQL binaries installed")
    base = tempfile.mkdtemp(prefix="glidein-pg-restart-")
    pg = ThrowawayPostgres(base).start()
    try:
        st = StateStore(pg.create_database("glidein_state"))
        with st.begin() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1  # a connection now in the pool
        pg.restart()
        with st.begin() as conn:  # the pooled one died with the server
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
