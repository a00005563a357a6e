"""Event-driven frontends: the demand asset's watcher (IdleJobsTrigger without a deadline).

The DAG file schedules a frontend with ``watch`` on its cron or its demand
asset; the watcher fires when matching idle jobs reach the threshold, never
below it, and not again within min_interval (state store). The last test goes
through Airflow's own wiring: the DAG processor's sync registers the watcher's
trigger, the trigger's event queues the frontend DAG, and its run publishes a
request; it prints the time from idle jobs to the published request.
"""

from __future__ import annotations

import importlib
import threading
import time

import pytest

from airflow_glidein import state, watch
from airflow_glidein.config import ConfigError, parse_config
from airflow_glidein.sensors.triggers import IdleJobsTrigger
from tests.helpers import DAGS, example_config, run_dag, task_states, write_config, xcom
from tests.standins.condor import Pool
from tests.test_sensors_demand import EAST, WEST, first_event, quiet_for

WATCH = {"threshold": 5, "poll": 1, "min_interval": 60}


@pytest.fixture
def pool(monkeypatch):
    p = Pool().install(monkeypatch)
    yield p
    p.close()


def watched_config(pool, tmp_path, monkeypatch, **fe):
    cfg = example_config()
    cfg["factory"]["retry_delay"] = 0
    cfg["frontends"][0].update({"demand": {"collector": pool.address, "constraint": 'Owner == "cms"', "timeout": 5},
                                "watch": dict(WATCH), **fe})
    return str(write_config(tmp_path, cfg, monkeypatch))


def watcher(path, **kw):
    args = {"frontend": "cms", "config_file": path, "threshold": 5, "poll_interval": 0.1, "min_interval": 60.0, **kw}
    return IdleJobsTrigger(**args)


def parse_frontends():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / "glidein_frontends.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


# ---- configuration and DAG file -------------------------------------------------------------------


def test_watch_config_is_validated():
    cfg = example_config()
    assert parse_config(cfg).frontend("cms").watch is None  # additive: without it, nothing changes
    cfg["frontends"][0]["watch"] = {"threshold": 10}
    w = parse_config(cfg).frontend("cms").watch
    assert (w.threshold, w.poll, w.min_interval) == (10, 30, 60)
    for bad, message in (({"threshold": 0}, "frontends[cms].watch.threshold: Input should be greater than 0"),
                         ({"poll": -5}, "frontends[cms].watch.poll: Input should be greater than 0"),
                         ({"min_interval": -1}, "frontends[cms].watch.min_interval: Input should be greater than or "
                                                "equal to 0"),
                         ({"treshold": 3}, "frontends[cms].watch.treshold: unknown field")):
        cfg["frontends"][0]["watch"] = bad
        with pytest.raises(ConfigError) as exc:
            parse_config(cfg)
        assert message in str(exc.value)


def test_frontend_dag_is_scheduled_on_its_cron_or_its_demand_watcher(pool, tmp_path, monkeypatch):
    from airflow.sdk import AssetOrTimeSchedule
    from airflow.triggers.base import BaseEventTrigger

    sd = pool.add_schedd("schedd1")
    sd.add_jobs(EAST, 50)
    path = watched_config(pool, tmp_path, monkeypatch)
    dags = parse_frontends()
    dag = dags["glidein_frontend_cms"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "*/5 * * * *"
    (asset,) = dag.timetable.asset_condition.objects
    assert asset.name == "glidein_demand_cms"
    (w,) = asset.watchers
    assert w.name == "glidein_demand_cms" and isinstance(w.trigger, BaseEventTrigger)
    assert w.trigger.serialize() == ("airflow_glidein.sensors.triggers.IdleJobsTrigger", {
        "frontend": "cms", "config_file": path, "threshold": 5, "entries": None, "poll_interval": 1.0,
        "deadline": None, "min_interval": 60.0})
    assert "Event-driven" in dag.doc_md and "`glidein_demand_cms`" in dag.doc_md
    assert sd.queries == []  # parsing asked no schedd
    # the watcher's identity is a hash of its kwargs: parsing again gives the same trigger
    again = parse_frontends()["glidein_frontend_cms"].timetable.asset_condition
    (w2,) = again.objects[0].watchers
    assert BaseEventTrigger.hash(*w2.trigger.serialize()) == BaseEventTrigger.hash(*w.trigger.serialize())

    watched_config(pool, tmp_path, monkeypatch, schedule=None)  # no cron: only demand starts it
    dag = parse_frontends()["glidein_frontend_cms"]
    assert not isinstance(dag.timetable, AssetOrTimeSchedule)
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["glidein_demand_cms"]

    cfg = example_config()  # without watch: the cron schedule alone, as before
    write_config(tmp_path, cfg, monkeypatch)
    dag = parse_frontends()["glidein_frontend_cms"]
    assert dag.timetable.expression == "*/5 * * * *" and "Event-driven" not in dag.doc_md


# ---- the watcher trigger --------------------------------------------------------------------------


def test_watcher_fires_on_demand_and_not_again_within_min_interval(pool, tmp_path, monkeypatch):
    sd = pool.add_schedd("schedd1")
    sd.add_jobs(EAST, 6)
    path = watched_config(pool, tmp_path, monkeypatch)
    event, _ = first_event(watcher(path, min_interval=1.5))
    assert event.payload["status"] == "success" and event.payload["demand"]["idle"] == 6
    fired = watch.last_fired(state.store(), "cms")
    assert fired["idle"] == 6 and abs(fired["fired"] - event.payload["at"]) < 1
    # the triggerer re-creates the trigger after the event; the jobs are still idle: no flood
    assert quiet_for(watcher(path, min_interval=1.5), 0.8)
    again, _ = first_event(watcher(path, min_interval=1.5))  # once min_interval has passed, it fires again
    assert again.payload["status"] == "success" and again.payload["at"] - event.payload["at"] >= 1.5


def test_watcher_stays_quiet_below_the_threshold_and_through_errors(pool, tmp_path, monkeypatch, capsys):
    sd = pool.add_schedd("schedd1")
    sd.add_jobs(EAST, 4)
    sd.add_jobs(WEST, 3, status=2)  # running: not demand
    path = watched_config(pool, tmp_path, monkeypatch)
    assert quiet_for(watcher(path), 0.8)
    assert len(sd.queries) >= 2  # it did look, more than once
    pool.collector.fail()  # an unreachable pool is logged and polled again, the watcher does not end
    assert quiet_for(watcher(path), 0.8)
    assert "Watching the demand of frontend cms failed (RuntimeError: the collector did not list" in capsys.readouterr().out
    assert watch.last_fired(state.store(), "cms") is None

    def heal_and_queue():
        pool.collector.heal()
        sd.add_jobs(WEST, 1)

    event, early = first_event(watcher(path), before=heal_and_queue, wait=0.5)
    assert not early and event.payload["demand"]["idle"] == 5
    assert event.payload["demand"]["per_entry"] == {"aws-us-east-1": 4, "aws-us-west-2": 1}


def test_only_one_of_concurrent_watchers_claims_the_frontend():
    """Two triggerers (HA) re-creating the same watcher must not both start a run."""
    store, now, wins = state.store(), time.time(), []
    barrier = threading.Barrier(6)

    def claim():
        barrier.wait()
        wins.append(watch.claim(store, "cms", 7, now, 60))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert watch.claim(store, "atlas", 1, now, 60) is True  # per frontend
    assert watch.claim(store, "cms", 7, now + 59, 60) is False and watch.claim(store, "cms", 7, now + 60, 60) is True


# ---- through Airflow: watcher registered by the DAG processor, event -> queued run -> request ------


@pytest.fixture
def synced(airflow_db):
    """What the DAG processor does: write the dags/ folder (with its asset watchers) to the metadata DB."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import delete, update

    def sync(unpause: str):
        with create_session() as session:
            DagBundlesManager().sync_bundles_to_db(session=session)
        bag = DagBag(dag_folder=str(DAGS), bundle_path=DAGS)
        sync_bag_to_db(bag, "dags-folder", None)
        with create_session() as session:  # a watcher runs only for an unpaused DAG
            session.execute(update(DagModel).where(DagModel.dag_id == unpause).values(is_paused=False))
        sync_bag_to_db(bag, "dags-folder", None)

    yield sync
    with create_session() as session:
        session.execute(delete(AssetDagRunQueue))
        session.execute(update(DagModel).where(DagModel.dag_id.like("glidein_%")).values(is_paused=True))


def test_idle_jobs_to_published_request_through_the_watcher(pool, tmp_path, monkeypatch, ec2, synced):
    from airflow.models.asset import AssetDagRunQueue, AssetEvent
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from sqlalchemy import select

    sd = pool.add_schedd("schedd1")
    sd.add_jobs(EAST, 2)  # below the threshold of 5
    watched_config(pool, tmp_path, monkeypatch)
    synced("glidein_frontend_cms")
    with create_session() as session:
        (row,) = [t for t in session.scalars(select(Trigger)) if "glidein_demand_cms" in [a.name for a in t.assets]]
        trigger_id, classpath, kwargs = row.id, row.classpath, row.kwargs
    # the triggerer builds the trigger from its row
    module, name = classpath.rsplit(".", 1)
    trigger = getattr(importlib.import_module(module), name)(**kwargs)
    assert quiet_for(trigger, 1.5)  # polls every second, stays quiet at 2 jobs

    appeared = {}

    def queue_jobs():
        sd.add_jobs(EAST, 40)
        appeared["t"] = time.monotonic()

    event, early = first_event(trigger, before=queue_jobs, wait=0.2)
    fired = time.monotonic()
    assert not early and event.payload["demand"]["idle"] == 42
    Trigger.submit_event(trigger_id, event)  # what the triggerer does with the event
    with create_session() as session:
        (ev,) = session.scalars(select(AssetEvent)).all()
        assert ev.asset.name == "glidein_demand_cms" and ev.extra["payload"]["demand"]["idle"] == 42
        queued = [q.target_dag_id for q in session.scalars(select(AssetDagRunQueue))]
    assert queued == ["glidein_frontend_cms"]  # the scheduler's next loop creates the run

    run = run_dag("glidein_frontend_cms")
    published = time.monotonic()
    assert str(run.state) == "success", task_states(run)
    levels = xcom(run, "publish_request")["levels"]
    assert levels["aws-us-east-1"] == 11  # 42 one-core jobs on 4-core pilots
    print(f"\ntime to launch request: idle jobs -> watcher event {fired - appeared['t']:.2f} s (poll 1 s), "
          f"event -> request published {published - fired:.2f} s (frontend run with dag.test)")
