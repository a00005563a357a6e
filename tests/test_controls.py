"""The operator controls' pure decisions: which downtime holds what, draining, and pilot requests."""

from __future__ import annotations

import pytest

from airflow_glidein import controls as C
from airflow_glidein import pilots as P
from airflow_glidein.lifecycle import Action

NOW = 1_800_000_000.0


def dt(entry="", frontend="", start=NOW - 10, end=None, drain=False, kind=C.DOWNTIME, reason="maint", i=1):
    return C.Downtime(i, kind, entry, frontend, start, end, drain, reason, "ops")


def test_scopes_entry_frontend_pair_and_factory():
    entry, fe, pair, factory = dt(entry="a"), dt(frontend="cms"), dt("a", "cms"), dt()
    assert C.hold([entry], "a", "cms", NOW) == C.hold([entry], "a", None, NOW) == "downtime: maint"
    assert C.hold([entry], "b", "cms", NOW) is None
    assert C.hold([fe], "b", "cms", NOW) == "downtime: maint" and C.hold([fe], "b", "atlas", NOW) is None
    assert C.hold([fe], "b", None, NOW) is None  # a frontend's downtime does not hold the entry for others
    assert C.hold([pair], "a", "cms", NOW) and not C.hold([pair], "b", "cms", NOW) and not C.hold([pair], "a", "x", NOW)
    assert C.entry_holds([factory], ["a", "b"], NOW) == {"a": "downtime: maint", "b": "downtime: maint"}
    assert C.pair_holds([pair], [("a", "cms"), ("a", "atlas")], NOW) == {("a", "cms"): "downtime: maint"}
    assert C.hold([dt(kind=C.STOP, reason="budget")], "a", "cms", NOW) == "stopped: budget"


def test_a_window_holds_only_while_it_lasts():
    d = dt(start=NOW + 60, end=NOW + 120)
    assert [C.hold([d], "a", None, t) for t in (NOW, NOW + 60, NOW + 119, NOW + 120)] == \
        [None, "downtime: maint", "downtime: maint", None]


def test_a_draining_downtime_retires_registered_pilots_once_and_terminates_none():
    rows = [{"id": i, "entry": "a", "frontend": "cms", "state": s, "memory": m} for i, s, m in [
        ("1", P.IDLE, {}), ("2", P.BUSY, {}), ("3", P.BUSY, {"retire_requested": NOW - 5}), ("4", P.BOOTING, {}),
    ]] + [{"id": "5", "entry": "b", "frontend": "cms", "state": P.BUSY, "memory": {}}]
    acts = C.drain_actions([dt(entry="a", drain=True)], rows, NOW)
    assert [(a.id, a.action) for a in acts] == [("1", "retire"), ("2", "retire")]
    assert C.drain_actions([dt(entry="a")], rows, NOW) == []  # without drain its pilots keep running


def test_pilot_requests_act_once_and_settle_when_every_pilot_is_taken():
    rows = {P.pilot_key("a", i): {"id": i, "entry": "a", "state": s, "memory": m} for i, s, m in [
        ("1", P.BUSY, {}), ("2", P.TERMINATING, {"terminate_requested": NOW}),
        ("3", P.BUSY, {"retire_requested": NOW})]}
    reqs = [{"id": 7, "action": "terminate", "entry": "a", "pilots": ["1", "2", "gone"], "who": "ann", "reason": "r"},
            {"id": 8, "action": "retire", "entry": "a", "pilots": ["3"], "who": "bo", "reason": "r"}]
    acts, done = C.pilot_actions(reqs, rows)
    assert [(a.id, a.action, a.reason) for a in acts] == [("1", "terminate", "terminated by ann: r")]
    assert done == [8]


def test_an_operator_terminate_replaces_a_policy_retire():
    merged = C.merge([Action("1", "a", "retire", "lifetime"), Action("2", "a", "terminate", "idle")],
                     [Action("1", "a", "terminate", "op"), Action("2", "a", "retire", "op")])
    assert {(a.id, a.action, a.reason) for a in merged} == {("1", "terminate", "op"), ("2", "terminate", "idle")}


@pytest.mark.parametrize(("text", "want"), [("now", NOW), ("+90m", NOW + 5400), ("+1d", NOW + 86400), ("", None),
                                            ("2027-01-15T12:00:00+01:00", 1800010800.0),
                                            ("2027-01-15T11:00", 1800010800.0)])
def test_times(text, want):
    assert C.parse_time(text, NOW, "--end") == want
