"""The pilot state machine and the reaping policy, as pure functions."""

from __future__ import annotations

import pytest

from airflow_glidein import lifecycle as L
from airflow_glidein import pilots as P
from airflow_glidein.config import parse_config
from tests.helpers import example_config

NOW = 1_000_000.0
BOOT = 900


def obs(ps=P.P_RUNNING, age=60.0, known=True, startd=None, collector=True):
    return L.Observation(ps, NOW - age, known, startd, collector)


def idle_ad(since=NOW - 30):
    return {"State": "Unclaimed", "Activity": "Idle", "EnteredCurrentState": since, "Name": "slot1@pilot"}


def busy_ad():
    return {"State": "Claimed", "Activity": "Busy", "EnteredCurrentState": NOW - 100, "Name": "slot1@pilot"}


# -- transitions ---------------------------------------------------------

@pytest.mark.parametrize("observation, memory, expected", [
    (obs(P.P_PENDING, age=10), L.Memory(), P.BOOTING),
    (obs(age=BOOT - 1), L.Memory(), P.BOOTING),
    (obs(age=BOOT + 1), L.Memory(), P.BOOT_FAILED),
    (obs(startd=idle_ad()), L.Memory(), P.IDLE),
    (obs(startd=busy_ad()), L.Memory(), P.BUSY),
    (obs(startd=busy_ad()), L.Memory(retire_requested=NOW - 5), P.RETIRING),
    (obs(), L.Memory(first_registered=NOW - 500, last_registered=NOW - 300), P.LOST),
    (obs(P.P_STOPPED), L.Memory(), P.STOPPED),
    (obs(P.P_ERROR, age=5), L.Memory(), P.BOOT_FAILED),
    (obs(known=False, startd=busy_ad()), L.Memory(), P.ORPHAN),
    (obs(P.P_TERMINATING), L.Memory(), P.TERMINATING),
    (obs(None), L.Memory(terminate_requested=NOW - 10, terminate_attempts=1), P.TERMINATED),
    (obs(P.P_TERMINATED), L.Memory(), P.TERMINATED),
    # no collector: a running VM is booting as far as we can know, however old
    (obs(age=10 * BOOT, collector=False), L.Memory(), P.BOOTING),
])
def test_transition(observation, memory, expected):
    state, _ = L.transition(memory, observation, NOW, BOOT)
    assert state == expected


def test_registration_is_remembered_so_a_vanished_startd_is_lost_not_booting():
    state, mem = L.transition(L.Memory(), obs(startd=idle_ad()), NOW, BOOT)
    assert state == P.IDLE and mem.first_registered == NOW and mem.last_registered == NOW
    state, mem2 = L.transition(mem, obs(), NOW + 60, BOOT)
    assert state == P.LOST and mem2.first_registered == NOW


def test_termination_ladder_ends_in_stuck_and_stays_there():
    mem = L.Memory(terminate_requested=NOW, terminate_attempts=1)
    assert L.transition(mem, obs(), NOW + 10, BOOT)[0] == P.TERMINATING
    # attempts 2 (terminate again) and 3 (force) each get their deadline
    mem = L.Memory(terminate_requested=NOW, terminate_attempts=2)
    assert L.transition(mem, obs(), NOW + L.TERMINATE_DEADLINE + 1, BOOT)[0] == P.TERMINATING
    mem = L.Memory(terminate_requested=NOW, terminate_attempts=3)
    assert L.transition(mem, obs(), NOW + 10, BOOT)[0] == P.TERMINATING
    state, mem = L.transition(mem, obs(), NOW + L.TERMINATE_DEADLINE + 1, BOOT)
    assert state == P.STUCK and mem.stuck_since == NOW + L.TERMINATE_DEADLINE + 1
    # stuck sticks, even when the provider says it is shutting down, until it is gone
    assert L.transition(mem, obs(P.P_TERMINATING), NOW + 9999, BOOT)[0] == P.STUCK
    assert L.transition(mem, obs(None), NOW + 9999, BOOT)[0] == P.TERMINATED


def test_stuck_and_terminating_are_never_capacity():
    assert P.STUCK not in P.CAPACITY and P.TERMINATING not in P.CAPACITY and P.STOPPED not in P.CAPACITY
    assert P.STUCK in P.LIVE  # but they hold quota


# -- reaping policy --------------------------------------------------------

@pytest.fixture
def cfg():
    data = example_config()
    data["entries"][0]["policy"] = {"boot_timeout": 900, "idle_timeout": 1200, "max_lifetime": 7200,
                                    "retire_window": 600}
    return parse_config(data)


def row(pid, state, age=100.0, startd=None, memory=None, frontend="cms", entry="aws-us-east-1", ps=P.P_RUNNING):
    return {"id": pid, "entry": entry, "frontend": frontend, "state": state, "launched": NOW - age,
            "startd": startd, "memory": (memory or L.Memory()).to_dict(), "provider_state": ps}


def decide(cfg, rows, levels=None):
    return {a.id: (a.action, a.reason) for a in L.reap(cfg, rows, levels or {}, NOW)}


def test_young_pilots_are_left_alone(cfg):
    rows = [row("boot", P.BOOTING), row("idle", P.IDLE, startd=idle_ad()), row("busy", P.BUSY, startd=busy_ad())]
    assert decide(cfg, rows, {("aws-us-east-1", "cms"): 5}) == {}


def test_boot_failed_stopped_and_lost(cfg):
    rows = [
        row("bf", P.BOOT_FAILED, age=1000),
        row("stop", P.STOPPED, ps=P.P_STOPPED),
        row("lost-new", P.LOST, memory=L.Memory(first_registered=NOW - 900, last_registered=NOW - 60)),
        row("lost-old", P.LOST, memory=L.Memory(first_registered=NOW - 900, last_registered=NOW - L.LOST_GRACE - 1)),
    ]
    d = decide(cfg, rows)
    assert d["bf"][0] == "terminate" and "boot_timeout (900 s)" in d["bf"][1]
    assert d["stop"] == ("terminate", "stopped at the provider, still holding quota")
    assert "lost-new" not in d
    assert d["lost-old"][0] == "terminate" and "startd gone" in d["lost-old"][1]


def test_max_lifetime_terminates_idle_but_retires_busy_then_terminates_after_window(cfg):
    old = 7201
    d = decide(cfg, [row("idle", P.IDLE, age=old, startd=idle_ad()), row("busy", P.BUSY, age=old, startd=busy_ad()),
                     row("boot", P.BOOTING, age=old)])
    assert d["idle"][0] == "terminate" and d["boot"][0] == "terminate"
    assert d["busy"][0] == "retire" and "letting jobs finish" in d["busy"][1]
    # retiring within its window: wait; past it: terminate
    retiring = row("busy", P.RETIRING, age=old, startd=busy_ad(), memory=L.Memory(retire_requested=NOW - 300))
    assert decide(cfg, [retiring]) == {}
    retiring["memory"]["retire_requested"] = NOW - 601
    assert decide(cfg, [retiring])["busy"][0] == "terminate"


def test_idle_timeout(cfg):
    d = decide(cfg, [row("a", P.IDLE, startd=idle_ad(NOW - 1201)), row("b", P.IDLE, startd=idle_ad(NOW - 1100))],
               {("aws-us-east-1", "cms"): 5})
    assert list(d) == ["a"] and "idle_timeout" in d["a"][1]


def test_scale_down_takes_longest_idle_first_and_never_busy(cfg):
    rows = [row(f"i{n}", P.IDLE, startd=idle_ad(NOW - 400 - n * 100)) for n in range(4)]
    rows += [row("busy", P.BUSY, startd=busy_ad()), row("fresh", P.IDLE, startd=idle_ad(NOW - 10))]
    d = decide(cfg, rows, {("aws-us-east-1", "cms"): 1})
    # 4 pilots idle past the grace, level 1: the 3 longest idle go; the fresh one is within its grace
    assert set(d) == {"i3", "i2", "i1"}
    assert all(a == "terminate" and r.startswith("scale-down") for a, r in d.values())
    # no request at all (frontend gone quiet): all settled idle pilots go, busy ones stay
    assert set(decide(cfg, rows)) == {"i0", "i1", "i2", "i3"}


def test_orphans_are_drained_unless_idle_or_past_lifetime(cfg):
    rows = [
        row("o-busy", P.ORPHAN, startd=busy_ad(), frontend="gone-vo"),
        row("o-idle", P.ORPHAN, startd=idle_ad(), frontend="gone-vo"),
        row("o-young", P.ORPHAN, frontend=None),
        row("o-never", P.ORPHAN, age=901, frontend=None),
    ]
    d = decide(cfg, rows)
    assert d["o-busy"][0] == "retire" and d["o-idle"][0] == "terminate" and d["o-never"][0] == "terminate"
    assert "o-young" not in d


def test_escalation_waits_for_the_deadline_then_forces(cfg):
    def term(attempts, ago, state=P.TERMINATING):
        return row("t", state, memory=L.Memory(terminate_requested=NOW - ago, terminate_attempts=attempts,
                                                terminate_reason="past max_lifetime"))
    assert decide(cfg, [term(1, 10)]) == {}
    assert decide(cfg, [term(1, L.TERMINATE_DEADLINE + 1)])["t"][0] == "terminate"
    assert decide(cfg, [term(2, L.TERMINATE_DEADLINE + 1)])["t"][0] == "force_terminate"
    stuck = decide(cfg, [term(3, L.TERMINATE_DEADLINE + 1, P.STUCK)])["t"]
    assert stuck[0] == "force_terminate" and "past max_lifetime" in stuck[1]


def test_pilots_of_entries_no_longer_configured_are_not_touched(cfg):
    assert decide(cfg, [row("x", P.IDLE, age=99999, entry="removed-entry", startd=idle_ad())]) == {}


def test_backoff_doubles_and_caps():
    assert L.backoff_until(0, NOW) == NOW
    assert [L.backoff_until(n, NOW) - NOW for n in (1, 2, 3, 7, 12)] == [60, 120, 240, 3600, 3600]


# -- a pilot's slot ads as one --------------------------------------------

def slot(pid, name, state, since, entry="aws-us-east-1", **kw):
    """A slot ad as a pilot advertises it: GLIDEIN_PILOT_ID is "entry/provider id"."""
    return {"GLIDEIN_PILOT_ID": f"{entry}/{pid}", "GLIDEIN_Entry_Name": entry, "Name": name, "State": state,
            "EnteredCurrentState": since, **kw}


def test_slot_ads_join_by_entry_and_id_and_old_pilots_by_their_entry_name():
    """Provider ids collide across endpoints: i-1 at two entries is two pilots. A pilot started before ids
    were qualified advertises the bare id; its GLIDEIN_Entry_Name qualifies it."""
    ads = [slot("7", "slot1@a", "Claimed", NOW - 10, entry="one-a"), slot("7", "slot1@b", "Unclaimed", NOW - 10,
                                                                          entry="one-b"),
           {"GLIDEIN_PILOT_ID": "8", "GLIDEIN_Entry_Name": "one-a", "Name": "slot1@old", "State": "Unclaimed"},
           {"GLIDEIN_PILOT_ID": "9", "Name": "slot1@no-entry", "State": "Unclaimed"}]
    out = L.pilot_ads(ads)
    assert set(out) == {"one-a/7", "one-b/7", "one-a/8"}
    assert out["one-a/7"]["State"] == "Claimed" and out["one-b/7"]["State"] == "Unclaimed"


def test_a_pilot_with_one_claimed_dynamic_slot_is_busy_whatever_the_order_of_its_ads():
    pslot = slot("i-1", "slot1@pilot-1", "Unclaimed", NOW - 5000, PartitionableSlot=True)
    dslot = slot("i-1", "slot1_1@pilot-1", "Claimed", NOW - 100, DynamicSlot=True)
    for ads in ([pslot, dslot], [dslot, pslot]):
        ad = L.pilot_ads(ads)["aws-us-east-1/i-1"]
        assert ad["State"] == "Claimed"
        assert L.transition(L.Memory(), obs(startd=ad), NOW, BOOT)[0] == P.BUSY


def test_an_idle_pilot_is_idle_since_its_latest_slot_change_and_draining_wins():
    ads = [slot("i-2", "slot1@p2", "Unclaimed", NOW - 900), slot("i-2", "slot2@p2", "Unclaimed", NOW - 30),
           slot("i-3", "slot1@p3", "Claimed", NOW - 50), slot("i-3", "slot2@p3", "Drained", NOW - 10),
           {"Name": "slot1@not-a-glidein", "State": "Unclaimed"}]
    out = L.pilot_ads(ads)
    assert set(out) == {"aws-us-east-1/i-2", "aws-us-east-1/i-3"}
    assert out["aws-us-east-1/i-2"]["Name"] == "slot2@p2" and L._idle_for(out["aws-us-east-1/i-2"], NOW) == 30
    assert L.transition(L.Memory(), obs(startd=out["aws-us-east-1/i-3"]), NOW, BOOT)[0] == P.RETIRING


def test_backed_off_entries_from_the_factory_status():
    status = {"backoff": {"a": {"until": NOW + 120, "failures": 2, "reason": "3 pilots failed to boot"},
                          "b": {"until": NOW - 1, "failures": 1, "reason": "over"}}}
    out = L.backed_off(status, NOW)
    assert list(out) == ["a"] and "another 120 s" in out["a"] and "3 pilots failed to boot" in out["a"]
    assert L.backed_off({}, NOW) == {}


def test_a_partitionable_pilot_whose_last_job_just_ended_is_not_idle_since_boot(cfg):
    """Its partitionable slot has been Unclaimed since boot, 80 min ago; its dynamic slot ran jobs until
    a moment ago. Idle time counts from the last cycle it was seen busy, not from the slot's clock."""
    boot = NOW - 5000
    pslot = slot("i-9", "slot1@p9", "Unclaimed", boot, PartitionableSlot=True)
    dslot = slot("i-9", "slot1_1@p9", "Claimed", NOW - 3000, DynamicSlot=True)
    state, mem = L.transition(L.Memory(), obs(age=5000, startd=L.pilot_ads([pslot, dslot])["aws-us-east-1/i-9"]), NOW, BOOT)
    assert state == P.BUSY and mem.last_busy == NOW
    # next cycle: the job ended, its dynamic slot is gone; only the partitionable slot is left
    later = NOW + 120
    state, mem = L.transition(mem, obs(age=5000, startd=pslot), later, BOOT)
    assert state == P.IDLE and mem.last_busy == NOW
    assert L._idle_for(pslot, later, mem) == 120
    assert L._idle_for(pslot, later) == 5120  # the slot's clock alone: idle since boot

    def decide_at(t, memory):
        return {a.id: a.reason for a in L.reap(cfg, [row("i-9", P.IDLE, age=NOW - boot, startd=pslot, memory=memory)],
                                               {("aws-us-east-1", "cms"): 0}, t)}

    assert decide_at(later, mem) == {}  # neither idle_timeout (1200 s) nor scale-down (300 s grace)
    assert "scale-down: idle 301 s" in decide_at(NOW + 301, mem)["i-9"]
    assert "idle for 1201 s > idle_timeout" in decide_at(NOW + 1201, mem)["i-9"]
