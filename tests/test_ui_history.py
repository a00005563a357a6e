"""The Pilots page's history: samples, means per bucket, hourly roll-up and the horizon (worked by hand)."""

from __future__ import annotations

from sqlalchemy import func, select

from airflow_glidein import history, state
from airflow_glidein.history import HISTORY, HOUR, RAW_SECONDS

DAY = 86400


def rows(store, step=None) -> int:
    q = select(func.count()).select_from(HISTORY)
    if step is not None:
        q = q.where(HISTORY.c.step == step)
    with store.begin() as conn:
        return conn.execute(q).scalar()


def test_a_missing_state_in_a_sample_counts_as_zero(state_store):
    store = state.store()
    t0 = 100 * HOUR
    history.record_factory({"A": {"cms": {"busy": 10, "idle": 2, "total": 12}}}, t0 + 10)
    history.record_factory({"A": {"cms": {"busy": 20, "total": 20}}, "B": {"cms": {"busy": 4}}}, t0 + 310)
    # one bucket of 600 s holds both samples: busy (10 + 20) / 2 = 15, idle (2 + 0) / 2 = 1
    s = history.series(store, ("pilots",), t0, 600, by_state=True)
    assert s == {"busy": {t0: 15.0 + 2.0}, "idle": {t0: 1.0}}  # B's 4 busy in one sample of two: +2
    assert history.series(store, ("pilots",), t0, 600, entry="A", by_state=True) == {"busy": {t0: 15.0},
                                                                                    "idle": {t0: 1.0}}
    assert history.sample_times(store, t0, 300) == [t0, t0 + 300]


def test_frontend_values_are_means_per_frontend_then_summed(state_store):
    store = state.store()
    t0 = 200 * HOUR

    def req(level: int, jobs: float) -> dict:
        return {"entries": {"A": {"idle": level, "max_running": 2 * level, "why": {"idle_jobs": jobs}}}}

    history.record_request("cms", req(4, 40), t0 + 1)
    history.record_request("cms", req(6, 60), t0 + 61)
    history.record_request("atlas", req(10, 100), t0 + 121)  # one sample of atlas in the bucket
    burst = {"entries": {"A": {"idle": 3, "max_running": 3, "why": {"idle_jobs": "-"}}}}  # a burst counts no jobs
    history.record_request("burst-b1", burst, t0 + 181)
    s = history.series(store, history.REQUEST_KINDS, t0, 600)
    # cms: level (4 + 6) / 2 = 5, atlas: 10 / 1 = 10, the burst 3 -> 18; idle jobs 50 + 100 = 150
    assert s["level"] == {t0: 18.0} and s["idle_jobs"] == {t0: 150.0} and s["max_running"] == {t0: 33.0}
    assert history.series(store, ("level",), t0, 600, frontend="cms") == {"level": {t0: 5.0}}
    history.record_request("atlas", req(1, 1), t0 + 601)  # only atlas sampled in the next bucket
    assert history.sample_times(store, t0, 600, by_state=False) == [t0, t0 + 600]
    assert history.sample_times(store, t0, 600, by_state=False, frontend="cms") == [t0]


def test_old_samples_become_hourly_sums_with_the_same_means_and_the_horizon_drops_older(state_store):
    store = state.store()
    now = 1000 * HOUR + 1800
    old = now - RAW_SECONDS - 2 * HOUR  # a whole hour past the raw window
    start = old - old % HOUR
    for i, busy in enumerate((3, 5, 7, 9)):  # four samples in one hour: busy mean 6; idle only in the first
        counts = {"A": {"cms": {"busy": busy, **({"idle": 8} if i == 0 else {})}}}
        history.record_factory(counts, start + 60 + i * 600, days=30)
    before = history.series(store, ("pilots",), start, HOUR, by_state=True)
    assert before == {"busy": {start: 6.0}, "idle": {start: 2.0}}
    history.record_factory({}, now, days=30)  # the next report prunes
    assert rows(store, step=0) == 1  # only the new sample is raw
    assert rows(store, step=HOUR) == 9  # busy sum 24 and idle sum 8 for A/cms and its 3 totals; the marker 4
    after = history.series(store, ("pilots",), start, HOUR, by_state=True)
    now_bucket = now - now % HOUR
    assert after == {"busy": {start: 6.0, now_bucket: 0.0}, "idle": {start: 2.0, now_bucket: 0.0}}
    # past the horizon it is gone
    history.prune(store, start + 31 * DAY, days=30)
    assert history.series(store, ("pilots",), 0, HOUR, by_state=True) == {}


def test_the_factory_report_and_the_frontend_publish_record_samples(ec2, airflow_db, tmp_path, monkeypatch):
    """DAG test: a frontend run and two factory runs leave the samples the charts draw."""
    from tests.helpers import example_config, run_dag, write_config, xcom

    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=1, verify_poll=1)
    write_config(tmp_path, cfg, monkeypatch)
    fe = run_dag("glidein_frontend_cms")
    levels = {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()}
    run_dag("glidein_factory")  # launches: its report counts them as requested
    run_dag("glidein_factory")  # its inventory lists them booting
    store = state.store()
    h = HISTORY.c
    with store.begin() as conn:
        pilots = conn.execute(select(h.t, h.state, h.value).where(
            h.kind == "pilots", h.entry == history.ALL, h.frontend == history.ALL).order_by(h.t)).all()
        asked = dict(conn.execute(select(h.entry, h.value).where(h.kind == "level", h.frontend == "cms")).all())
        samples = conn.execute(select(func.count()).where(h.kind == history.FACTORY_SAMPLE)).scalar()
    launched = len(ec2.instances("us-east-1")) + len(ec2.instances("us-west-2"))
    assert samples == 2 and launched == 15
    assert [(s, v) for _, s, v in pilots] == [("requested", launched), ("booting", launched)]
    assert asked == {**levels, history.ALL: sum(levels.values())}


def test_a_sample_the_store_refuses_is_logged_not_raised(state_store, caplog):
    store = state.store()
    with store.begin() as conn:
        conn.exec_driver_sql("DROP TABLE glidein_history")  # e.g. a deployment whose migration has not run
    assert history.record_request("cms", {"entries": {"A": {"idle": 1}}}, 1000.0) is False
    assert history.record_factory({"A": {"cms": {"busy": 1}}}, 1000.0) is False
    assert "History sample not recorded" in caplog.text


def test_a_store_that_cannot_be_opened_loses_the_sample_not_the_request(monkeypatch, caplog):
    def unreachable(*_a, **_k):
        raise RuntimeError("state store connection glidein_state: could not connect")

    monkeypatch.setattr(state, "store", unreachable)
    assert history.record_request("cms", {"entries": {"A": {"idle": 1}}}, 1000.0) is False
    assert "the state store is unavailable: state store connection glidein_state" in caplog.text
