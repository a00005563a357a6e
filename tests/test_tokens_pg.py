"""Bootstrap token exchanges racing on PostgreSQL: several processes exchange one launch's token at once.
Each instance is bound at most once, and never more instances than the launch has VMs."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from airflow_glidein import state
from airflow_glidein.bootstrap import tokens
from tests.pg import run_at_once

EXCHANGER = """
from airflow_glidein import state
from airflow_glidein.bootstrap import tokens

url, token, pilot_id = ARGS
st = state.store(url)
start_line()
try:
    tokens.exchange(st, token, pilot_id, time.time(), lambda launch, pid: True)
    finish("bound")
except tokens.Refused as exc:
    finish(f"refused {exc.status}: {exc}")
"""


def _launch(url: str, count: int) -> str:
    token = tokens.new_token()
    launch = tokens.Launch("f.cms.one-a.0", "demo-factory", "one-a", "cms", count, "conn_a", None, "TRUE",
                           {"boot_timeout": 900, "max_lifetime": 3600}, time.time())
    tokens.register_launch(state.store(url), launch, token, time.time() + 900)
    return token


@pytest.mark.parametrize("ids, bound", [
    (["i-0", "i-1", "i-2", "i-3", "i-4", "i-5"], 3),  # six distinct instances, a launch of three
    (["i-7"] * 5, 1),  # one instance's wrapper retried five times at once
])
def test_concurrent_exchanges_bind_each_instance_once_within_the_count(pg_state_url, tmp_path, ids, bound):
    token = _launch(pg_state_url, count=3)
    results = run_at_once(tmp_path, EXCHANGER, [[pg_state_url, token, pid] for pid in ids])
    assert results.count("bound") == bound, results
    refusals = [r for r in results if r != "bound"]
    assert all(r.startswith("refused 403") for r in refusals), refusals
    with state.store(pg_state_url).begin() as conn:
        rows = conn.execute(select(tokens.bindings.c.pilot_id, func.count()).group_by(tokens.bindings.c.pilot_id)).all()
        uploads = conn.execute(select(func.count()).where(tokens.tokens.c.kind == tokens.UPLOAD)).scalar_one()
    assert len(rows) == bound and all(n == 1 for _, n in rows) and uploads == bound
