"""The inventory joined with the collector, as whole DAG runs: EC2 pilots on moto, startd ads in the pool stand-in.

The factory lists its instances on moto and reads the startd ads of the
pool stand-in (tests/standins/condor.py) through the real htcondor2 module,
by GLIDEIN_PILOT_ID. The test plays the pilots: it adds a startd ad when a
pilot registers, changes it when a job claims it, and takes it away when the
pilot dies; the factory's clock is moved forward instead of waiting.
"""

from __future__ import annotations

import pytest

from airflow_glidein import dashboard, lifecycle, pilotdb, state
from airflow_glidein import pilots as P
from tests.helpers import Clock, example_config, idle_jobs, run_dag, task_states, write_config, write_queue, xcom
from tests.standins.condor import Pool

pytestmark = pytest.mark.usefixtures("airflow_db")

ENTRY = "aws-us-east-1"
POLICY = {"boot_timeout": 900, "idle_timeout": 1200, "max_lifetime": 7200, "retire_window": 600}


@pytest.fixture
def pool(monkeypatch):
    p = Pool().install(monkeypatch)
    yield p
    p.close()


def collector_config(tmp_path, monkeypatch, pool, jobs: int, max_pilots: int):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=2, verify_poll=1, collector=pool.address)
    cfg["entries"] = cfg["entries"][:1]
    cfg["entries"][0].update(limits={"max_pilots": max_pilots, "max_idle": 10, "max_per_cycle": 10, "batch_size": 5},
                             policy=POLICY)
    fe = cfg["frontends"][0]
    fe.update(entries=[ENTRY], request_ttl=100000)
    fe["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(jobs, "AWS_US_EAST_1", cpus=4))  # a pilot each
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


def register(pool, iid: str, state: str, since: float, factory: str = "demo-factory", slot: str = "slot1"):
    """The startd ad a pilot's slot advertises (what the glidein's startd sets, trimmed)."""
    return pool.add_startd({
        "Name": f"{slot}@glidein-{iid}", "GLIDEIN_PILOT_ID": iid, "GLIDEIN_Factory": factory,
        "GLIDEIN_Entry_Name": ENTRY, "State": state, "Activity": "Busy" if state == "Claimed" else "Idle",
        "EnteredCurrentState": int(since),
    })


def table():
    return pilotdb.load_pilots(state.store())


def states_of(ids):
    rows = table()
    return {i: rows[i]["state"] for i in ids if i in rows}


def ok(run):
    assert str(run.state) == "success", task_states(run)
    return run


def actions_of(run):
    return {a["id"]: (a["action"], a["reason"]) for a in xcom(run, "plan_cycle", key="actions")}


def live_ids(ec2):
    return {i["InstanceId"] for i in ec2.instances()}


def test_inventory_joins_the_collector_and_reaps_by_state(ec2, pool, tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    collector_config(tmp_path, monkeypatch, pool, jobs=6, max_pilots=6)
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    idle, busy, lost, booting, dead, idler = sorted(live_ids(ec2))
    now = clock.now()
    register(pool, idle, "Unclaimed", now - 60)
    register(pool, busy, "Claimed", now - 30)
    register(pool, lost, "Unclaimed", now - 60)
    register(pool, idler, "Unclaimed", now - 60)
    register(pool, booting, "Claimed", now, factory="another-factory")  # not ours: the query leaves it out
    ec2.age([dead], POLICY["boot_timeout"] + 100)  # never registered, past boot_timeout

    run = ok(run_dag("glidein_factory"))
    counts = xcom(run, "inventory")["counts"][ENTRY]["cms"]
    assert {s: counts.get(s, 0) for s in (P.IDLE, P.BUSY, P.BOOTING, P.BOOT_FAILED)} == {
        P.IDLE: 3, P.BUSY: 1, P.BOOTING: 1, P.BOOT_FAILED: 1}
    assert actions_of(run) == {dead: ("terminate", "did not register within boot_timeout (900 s)")}
    assert states_of([idle, busy, lost, booting, idler, dead]) == {
        idle: P.IDLE, busy: P.BUSY, lost: P.IDLE, booting: P.BOOTING, idler: P.IDLE, dead: P.TERMINATING}
    rows = table()
    assert rows[busy]["startd"] == {"Name": f"slot1@glidein-{busy}", "State": "Claimed", "Activity": "Busy",
                                    "EnteredCurrentState": int(now - 30)}
    assert rows[idle]["memory"]["first_registered"] is not None and rows[booting]["memory"]["first_registered"] is None
    assert dead not in live_ids(ec2)
    status = xcom(run, "report")
    reported = status["pilots"][ENTRY]["cms"]
    assert (reported[P.IDLE], reported[P.BUSY], reported[P.BOOTING]) == (3, 1, 1)
    assert reported.get(P.BOOT_FAILED, 0) + reported.get(P.TERMINATING, 0) == 1  # before or after reaping
    assert status["actions"] == {"terminate": 1}
    # a boot failure in the same cycle as registrations: the entry works, no backoff
    assert status["backoff"] == {}

    # The lost pilot's startd vanishes; the idler has been idle past idle_timeout; the busy one is past
    # max_lifetime: it is asked to retire (jobs finish), not terminated.
    pool.remove_startds([lost])
    pool.remove_startds([idler])
    register(pool, idler, "Unclaimed", clock.now() - POLICY["idle_timeout"] - 100)
    ec2.age([busy], POLICY["max_lifetime"] + 100)
    run = ok(run_dag("glidein_factory"))
    acts = actions_of(run)
    assert acts[idler][0] == "terminate" and "idle_timeout (1200 s)" in acts[idler][1]
    assert acts[busy][0] == "retire" and "letting jobs finish" in acts[busy][1]
    assert lost not in acts and idle not in acts and booting not in acts  # lost: within LOST_GRACE
    assert pool.commands == [("OffPeaceful", f"slot1@glidein-{busy}")]
    assert states_of([idle, busy, lost, booting, idler]) == {
        idle: P.IDLE, busy: P.RETIRING, lost: P.LOST, booting: P.BOOTING, idler: P.TERMINATING}
    assert table()[busy]["memory"]["retire_requested"] is not None
    assert busy in live_ids(ec2) and idler not in live_ids(ec2)
    assert xcom(run, "report")["pilots"][ENTRY]["cms"][P.LOST] == 1

    # Past the retire window (the job still runs) and past the lost grace: both are terminated.
    clock.offset = max(POLICY["retire_window"], lifecycle.LOST_GRACE) + 60
    run = ok(run_dag("glidein_factory"))
    acts = actions_of(run)
    assert acts[busy][0] == "terminate" and "retire_window (600 s) over" in acts[busy][1]
    assert acts[lost][0] == "terminate" and "startd gone from the collector" in acts[lost][1]
    assert idle not in acts and booting not in acts
    assert pool.commands == [("OffPeaceful", f"slot1@glidein-{busy}")]  # retired once, not again
    assert not {busy, lost, idler, dead} & live_ids(ec2)
    assert {idle, booting} <= live_ids(ec2)


def test_scale_down_takes_idle_pilots_longest_idle_first_never_busy(ec2, pool, tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    collector_config(tmp_path, monkeypatch, pool, jobs=5, max_pilots=5)
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    a, b, c, busy, pslots = sorted(live_ids(ec2))
    now = clock.now()
    for iid, idle_for in ((a, 400), (b, 600), (c, 500)):
        register(pool, iid, "Unclaimed", now - idle_for)
    register(pool, busy, "Claimed", now - 5000)
    # a pilot with a partitionable slot: the slot stays Unclaimed (long since) while a dynamic slot runs a job
    register(pool, pslots, "Claimed", now - 100, slot="slot1_1")
    register(pool, pslots, "Unclaimed", now - 5000, slot="slot1")
    ok(run_dag("glidein_factory"))
    assert states_of([a, b, c, busy, pslots]) == {a: P.IDLE, b: P.IDLE, c: P.IDLE, busy: P.BUSY, pslots: P.BUSY}

    # Demand falls to one pilot: the frontend asks for 1; the factory takes the two longest idle.
    write_queue(tmp_path, idle_jobs(1, "AWS_US_EAST_1", cpus=4))
    fe = ok(run_dag("glidein_frontend_cms"))
    assert xcom(fe, "plan_pilots")["entries"][ENTRY]["idle"] == 1
    run = ok(run_dag("glidein_factory"))
    acts = actions_of(run)
    assert set(acts) == {b, c}
    assert all(kind == "terminate" and why.startswith("scale-down") for kind, why in acts.values())
    assert {a, busy, pslots} <= live_ids(ec2) and not {b, c} & live_ids(ec2)

    # No demand at all: the last idle pilot goes too; the busy ones stay, however long the pilot has run.
    write_queue(tmp_path, [])
    ok(run_dag("glidein_frontend_cms"))
    clock.offset = 600
    run = ok(run_dag("glidein_factory"))
    assert set(actions_of(run)) == {a}
    assert live_ids(ec2) == {busy, pslots}

    # The partitionable pilot's job ends: its dynamic slot goes, its partitionable slot has been Unclaimed
    # since boot. It is idle since the factory last saw it busy, not since boot: it gets the scale-down
    # grace (a negotiation cycle may give it work) before it goes.
    pool.startds = [ad for ad in pool.startds if ad["Name"] != f"slot1_1@glidein-{pslots}"]
    clock.offset = 700
    run = ok(run_dag("glidein_factory"))
    assert states_of([pslots]) == {pslots: P.IDLE} and actions_of(run) == {}
    clock.offset = 600 + lifecycle.SCALE_DOWN_GRACE + 60
    run = ok(run_dag("glidein_factory"))
    (kind, why), = actions_of(run).values()
    assert list(actions_of(run)) == [pslots] and kind == "terminate" and why.startswith("scale-down: idle ")
    assert lifecycle.SCALE_DOWN_GRACE < int(why.split()[2]) < lifecycle.SCALE_DOWN_GRACE + 120  # not ~5000 s
    assert live_ids(ec2) == {busy}


def two_entry_config(tmp_path, monkeypatch, pool):
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=2, verify_poll=1, collector=pool.address)
    for e in cfg["entries"]:
        e["policy"] = POLICY
    fe = cfg["frontends"][0]
    fe["request_ttl"] = 100000
    # 16 one-core jobs that run at either entry: 8 each, 2 pilots of 4 cores east, 1 of 8 west
    fe["demand"]["queue_file"] = write_queue(tmp_path, idle_jobs(16, "AWS_US_EAST_1,AWS_US_WEST_2"))
    write_config(tmp_path, cfg, monkeypatch)


def test_entry_whose_pilots_fail_to_boot_is_backed_off_and_the_frontend_plans_elsewhere(
        ec2, pool, tmp_path, monkeypatch):
    east, west = "aws-us-east-1", "aws-us-west-2"
    clock = Clock(monkeypatch)
    two_entry_config(tmp_path, monkeypatch, pool)
    fe = ok(run_dag("glidein_frontend_cms"))
    assert {e: p["idle"] for e, p in xcom(fe, "plan_pilots")["entries"].items()} == {east: 2, west: 1}
    ok(run_dag("glidein_factory"))
    dead = [i["InstanceId"] for i in ec2.instances("us-east-1")]
    assert len(dead) == 2
    (alive,) = [i["InstanceId"] for i in ec2.instances("us-west-2")]
    register(pool, alive, "Unclaimed", clock.now())
    ec2.age(dead, POLICY["boot_timeout"] + 100)

    # East's pilots never registered: one failed cycle backs it off for 60 s; west's pilot registered.
    run = ok(run_dag("glidein_factory"))
    now = clock.now()
    backoff = xcom(run, "report")["backoff"]
    assert list(backoff) == [east] and backoff[east]["failures"] == 1
    assert backoff[east]["reason"] == "2 pilots failed to boot"
    assert 50 < backoff[east]["until"] - now <= 60
    assert not {i["InstanceId"] for i in ec2.instances("us-east-1")}  # the dead ones are gone
    page = dashboard.render(dashboard.snapshot())  # the Pilots page reads the same status
    assert f"Entry {east} backed off: 2 pilots failed to boot" in page

    # The frontend leaves east out this cycle, with the reason; all 16 jobs are planned at west.
    fe = ok(run_dag("glidein_frontend_cms"))
    plan = xcom(fe, "plan_pilots")
    assert list(plan["entries"]) == [west] and plan["entries"][west]["why"]["idle_jobs"] == 16
    assert "backed off by the factory" in plan["skipped"][east] and "2 pilots failed to boot" in plan["skipped"][east]
    assert plan["entries"][west]["idle"] == 2  # 16 cores: two 8-core pilots, one of them already idle
    run = ok(run_dag("glidein_factory"))
    assert xcom(run, "plan_cycle", key="decisions")[west]["launch"] == 1
    assert not ec2.instances("us-east-1") and len(ec2.instances("us-west-2")) == 2

    # After the backoff, east is planned again; its next pilots fail too: the backoff doubles.
    clock.offset = 61
    fe = ok(run_dag("glidein_frontend_cms"))
    assert east in xcom(fe, "plan_pilots")["entries"] and east not in xcom(fe, "plan_pilots")["skipped"]
    ok(run_dag("glidein_factory"))
    failing, late = sorted(i["InstanceId"] for i in ec2.instances("us-east-1"))
    ec2.age([failing], POLICY["boot_timeout"] + 100)
    run = ok(run_dag("glidein_factory"))
    backoff = xcom(run, "report")["backoff"]
    assert backoff[east]["failures"] == 2 and 110 < backoff[east]["until"] - clock.now() <= 120
    assert east in xcom(ok(run_dag("glidein_frontend_cms")), "plan_pilots")["skipped"]

    # The other pilot was just slow: it registers, and that clears the backoff at once.
    register(pool, late, "Unclaimed", clock.now())
    run = ok(run_dag("glidein_factory"))
    assert xcom(run, "report")["backoff"] == {}
    assert pilotdb.load_health(state.store())[east]["failures"] == 0
    plan = xcom(ok(run_dag("glidein_frontend_cms")), "plan_pilots")
    assert east in plan["entries"] and plan["skipped"] == {}


def test_a_startd_that_cannot_be_retired_does_not_stop_the_others(ec2, pool, tmp_path, monkeypatch):
    from airflow_glidein.operators import InventoryOperator

    collector_config(tmp_path, monkeypatch, pool, jobs=2, max_pilots=2)
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    stays, leaves = sorted(live_ids(ec2))
    for iid in (stays, leaves):
        register(pool, iid, "Claimed", Clock(monkeypatch).now() - 100)
    ec2.age([stays, leaves], POLICY["max_lifetime"] + 100)
    real = InventoryOperator.execute

    def inventory_then_one_startd_leaves(op, context):  # between the inventory and the retire
        out = real(op, context)
        pool.remove_startds([leaves])
        return out

    monkeypatch.setattr(InventoryOperator, "execute", inventory_then_one_startd_leaves)
    run = run_dag("glidein_factory")
    assert {a: kind for a, (kind, _) in actions_of(run).items()} == {stays: "retire", leaves: "retire"}
    assert task_states(run)["reap_pilots"] == "failed"  # named, after Airflow's retries
    # the one that could be asked was asked once (the retries did not ask again) and is remembered as retiring
    assert pool.commands == [("OffPeaceful", f"slot1@glidein-{stays}")]
    rows = table()
    assert rows[stays]["state"] == P.RETIRING and rows[stays]["memory"]["retire_requested"] is not None
    assert rows[leaves]["memory"]["retire_requested"] is None


def test_pilots_of_a_removed_entry_are_drained_unless_idle(ec2, pool, tmp_path, monkeypatch):
    """docs/architecture.md: never an automatic "remove everything" (glideinWMS #282); a pilot of an entry taken out
    of the configuration is an orphan: drained (startd shutdown, jobs finish) unless idle or never registered."""
    clock = Clock(monkeypatch)
    cfg = example_config()
    cfg["factory"].update(retry_delay=0, verify_timeout=2, verify_poll=1, collector=pool.address)
    b = cfg["entries"][1]
    b.update(name="aws-us-east-1b", region="us-east-1", attrs={"GLIDEIN_Site": "AWS_US_EAST_1B"})
    for e in cfg["entries"]:
        e["policy"] = POLICY
    fe = cfg["frontends"][0]
    fe.update(entries=[ENTRY, "aws-us-east-1b"], request_ttl=100000)
    fe["demand"]["queue_file"] = write_queue(
        tmp_path, idle_jobs(2, "AWS_US_EAST_1", cpus=4) + idle_jobs(3, "AWS_US_EAST_1B", cpus=8, start=2))
    write_config(tmp_path, cfg, monkeypatch)
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    by_entry = {}
    for i in ec2.instances():
        by_entry.setdefault(i["TagMap"][P.TAG_ENTRY], []).append(i["InstanceId"])
    kept, (idler, worker, unborn) = sorted(by_entry[ENTRY]), sorted(by_entry["aws-us-east-1b"])
    assert len(kept) == 2
    now = clock.now()
    for iid in kept:
        register(pool, iid, "Claimed", now - 60)
    register(pool, idler, "Unclaimed", now - 60)
    register(pool, worker, "Claimed", now - 60)

    # the entry is taken out of the configuration
    cfg["entries"] = cfg["entries"][:1]
    fe["entries"] = [ENTRY]
    write_config(tmp_path, cfg, monkeypatch)
    run = ok(run_dag("glidein_factory"))
    acts = actions_of(run)
    assert acts == {idler: ("terminate", "orphan (unknown frontend or entry), idle"),
                    worker: ("retire", "orphan (unknown frontend or entry), busy: draining")}
    assert pool.commands == [("OffPeaceful", f"slot1@glidein-{worker}")]
    rows = table()
    assert states_of([idler, worker, unborn]) == {idler: P.TERMINATING, worker: P.RETIRING, unborn: P.ORPHAN}
    assert all(rows[i]["entry"] == ENTRY for i in (idler, worker, unborn))  # reached through the entry left
    assert all("entry 'aws-us-east-1b' is no longer configured" in rows[i]["detail"] for i in (worker, unborn))
    assert live_ids(ec2) == set(kept) | {worker, unborn}  # the never-registered one gets its boot_timeout

    # past its boot timeout the one that never registered goes too; the draining one is left to finish
    clock.offset = POLICY["boot_timeout"] + 60
    register(pool, worker, "Claimed", clock.now() - 60)
    run = ok(run_dag("glidein_factory"))
    assert actions_of(run) == {unborn: ("terminate", "orphan (unknown frontend or entry) never registered")}
    assert live_ids(ec2) & {idler, worker, unborn} == {worker} and set(kept) <= live_ids(ec2)
    assert pool.commands == [("OffPeaceful", f"slot1@glidein-{worker}")]  # asked to drain once
