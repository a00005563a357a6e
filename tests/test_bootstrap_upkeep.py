"""What the bootstrap service keeps is pruned: expired tokens, used launches, old pilot logs, dead uploads.

The factory's report task prunes once per cycle (a real DAG run shows it);
the pruning itself is checked table by table and file by file.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, update

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import listings, tokens, upkeep
from airflow_glidein.bootstrap.logs import LogStore, files
from airflow_glidein.state import store
from tests.helpers import example_config, run_dag, write_config
from tests.pilot_helpers import launch
from tests.test_bootstrap_adversarial import ENTRY, fields, token_of
from tests.test_bootstrap_adversarial import Service as ServiceServer

pytestmark = pytest.mark.usefixtures("airflow_db")
DAY = 86400


def rows(table) -> int:
    with store().begin() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def cfg(ec2, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOGS", f"file://{tmp_path}/pilot-logs")
    data = example_config()
    data["factory"].update({"retry_delay": 0, "bootstrap_url": "http://127.0.0.1:9/glidein"})
    write_config(tmp_path, data, monkeypatch)
    return data


def test_expired_tokens_used_launches_and_their_bindings_go_live_ones_stay(cfg):
    now = time.time()
    (old_iid,), old_text = launch(cfg, now=now - 3 * DAY)  # its pilot's lifetime (12 h) ended long ago
    old = U.parse(old_text)
    _, old_upload, _, _ = tokens.exchange(store(), old["token"], old_iid, now - 3 * DAY, lambda launch, pid: True)
    (iid,), text = launch(cfg)
    live = U.parse(text)
    _, upload, _, _ = tokens.exchange(store(), live["token"], iid, now, lambda launch, pid: True)
    with store().begin() as conn:  # the old launch was listed once
        conn.execute(listings.listings.insert().values(launch_id=old["launch_id"], ids=old_iid, listed=0, next=0))
    assert (rows(tokens.tokens), rows(tokens.bindings), rows(tokens.launches)) == (4, 2, 2)

    gone = upkeep.prune(now=now)
    assert gone == {"tokens": 2, "launches": 1, "bindings": 1, "logs": 0, "uploads": 0}
    with store().begin() as conn:
        assert [r.launch_id for r in conn.execute(select(tokens.launches))] == [live["launch_id"]]
        assert [r.pilot_id for r in conn.execute(select(tokens.bindings))] == [iid]
    assert rows(listings.listings) == 0
    # the live pilot's upload token still writes its logs; the old pilot's is unknown now
    assert tokens.uploader(store(), upload, now, None) == (ENTRY, iid, None)
    with pytest.raises(tokens.Refused, match="unknown bootstrap token"):
        tokens.uploader(store(), old_upload, now, old_iid)
    assert upkeep.prune(now=now) == {"tokens": 0, "launches": 0, "bindings": 0, "logs": 0, "uploads": 0}


def test_old_logs_and_dead_uploads_are_pruned(cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__PILOT_LOG_RETENTION_DAYS", "7")
    svc = ServiceServer()
    try:
        (a, b), text = launch(cfg, count=2)
        ups = {i: fields(svc.exchange(token_of(text), i))["upload_token"] for i in (a, b)}
        for i in (a, b):
            assert svc.upload(ups[i], "glidein.log", b"log of " + i.encode()).status_code == 200
    finally:
        svc.stop()
    ls = LogStore.from_config()
    now = time.time()
    with store().begin() as conn:  # a's log is 8 days old; an upload of b's died 2 hours ago, leaving its part
        conn.execute(update(files).where(files.c.pilot_id == a).values(updated=now - 8 * DAY))
        conn.execute(files.insert().values(entry=ENTRY, pilot_id=b, name="MasterLog", upload="dead", bytes=1000,
                                           updated=now - 7200))
    (ls.pilot_dir(ENTRY, b) / ".MasterLog.dead.part").write_bytes(b"half")

    assert ls.prune(store(), now) == {"logs": 1, "uploads": 1}
    assert not ls.pilot_dir(ENTRY, a).exists()
    assert [p.name for p in ls.pilot_dir(ENTRY, b).iterdir()] == ["glidein.log"]
    with store().begin() as conn:
        assert [(r.pilot_id, r.name, r.upload) for r in conn.execute(select(files))] == [(b, "glidein.log", "")]


def test_the_factory_cycle_prunes(cfg):
    launch(cfg, now=time.time() - 3 * DAY)
    assert rows(tokens.launches) == 1
    run_dag("glidein_factory")
    assert rows(tokens.launches) == 0 and rows(tokens.tokens) == 0
