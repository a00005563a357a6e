"""What a Celery deployment changes for the product's own code (found by the soak).

A Celery worker runs tasks in prefork pool processes that multiprocessing marks daemonic, and
Airflow forks the task process from one; a daemonic process may not start multiprocessing
children. The frontend asks each schedd from a forked child (demand.run_isolated), so under Celery
every query_demand failed with "daemonic processes are not allowed to have children".
"""

from __future__ import annotations

import multiprocessing

from airflow_glidein import demand


def _answer() -> int:
    return 42


def test_schedd_queries_fork_inside_a_daemonic_worker_process(monkeypatch):
    me = multiprocessing.current_process()
    monkeypatch.setitem(me._config, "daemon", True)  # what billiard's pool process is
    results = demand.run_isolated({"schedd-a": _answer, "schedd-b": _answer}, timeout=60)
    assert results == {"schedd-a": (True, 42), "schedd-b": (True, 42)}
    assert me._config["daemon"] is True  # the mark is back once the children have started
