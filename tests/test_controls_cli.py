"""``python -m airflow_glidein downtime add|list|end``, ``stop`` and ``resume``: what they store, and clear
errors for bad input (exit 2, a message naming the value, no traceback)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from airflow_glidein import controls, state
from airflow_glidein.cli import main
from tests.helpers import example_config, write_config

EAST, WEST = "aws-us-east-1", "aws-us-west-2"


@pytest.fixture
def config(tmp_path, monkeypatch):
    return write_config(tmp_path, example_config(), monkeypatch)


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_downtime_add_list_end(config, capsys):
    rc, out, _ = run(capsys, "downtime", "add", "--entry", EAST, "--end", "+2h", "--reason", "site maintenance",
                     "--who", "alice")
    assert rc == 0 and f"downtime #1 on entry {EAST}" in out and "site maintenance" in out
    rc, out, _ = run(capsys, "downtime", "add", "--frontend", "cms", "--start", "2099-01-01T06:00",
                     "--end", "2099-01-01T08:00Z", "--reason", "VO review", "--drain")
    assert rc == 0 and "draining" in out

    now = time.time()
    (east, cms) = controls.load(state.store(), now)
    assert (east.entry, east.frontend, east.who, east.drain) == (EAST, "", "alice", False)
    assert east.active(now) and 7100 < east.end - now <= 7200
    assert (cms.entry, cms.frontend, cms.drain, cms.active(now)) == ("", "cms", True, False)
    assert cms.start == datetime(2099, 1, 1, 6, tzinfo=timezone.utc).timestamp()  # UTC unless it says
    assert controls.hold([east, cms], EAST, "cms", now) == "downtime: site maintenance"
    assert controls.hold([east, cms], WEST, "cms", now) is None  # the VO review has not started

    rc, out, _ = run(capsys, "downtime", "list")
    assert rc == 0 and f"#1 downtime ACTIVE entry {EAST}" in out and "#2 downtime scheduled frontend cms" in out
    rc, out, _ = run(capsys, "downtime", "list", "--json")
    assert [d["id"] for d in json.loads(out)] == [1, 2]

    rc, out, _ = run(capsys, "downtime", "end", "1")
    assert rc == 0 and "ended" in out
    assert [d.id for d in controls.load(state.store(), time.time())] == [2]
    history = controls.recent(state.store())
    assert [h["action"] for h in history] == ["end downtime", "downtime", "downtime"]
    assert history[-1]["who"] == "alice" and history[-1]["reason"] == "site maintenance"


@pytest.mark.parametrize(("args", "message"), [
    (["add", "--entry", "nowhere", "--reason", "x"], "entry 'nowhere' is not in the configuration"),
    (["add", "--frontend", "atlas", "--reason", "x"], "frontend 'atlas' is not in the configuration"),
    (["add", "--reason", "   "], "needs a reason"),
    (["add", "--reason", "x", "--end", "tomorrow"], "--end 'tomorrow' is not a time"),
    (["add", "--reason", "x", "--start", "+3h", "--end", "+1h"], "is not after the start"),
    (["end", "42"], "no downtime or stop #42"),
])
def test_bad_downtime_input_is_a_clear_error(config, capsys, args, message):
    rc, out, err = run(capsys, "downtime", *args)
    assert rc == 2 and message in err and "Traceback" not in err and out == ""
    assert controls.load(state.store(), time.time()) == []


def test_ending_a_downtime_twice_says_when_it_ended(config, capsys):
    assert run(capsys, "downtime", "add", "--reason", "whole factory")[0] == 0
    assert run(capsys, "downtime", "end", "1")[0] == 0
    rc, _, err = run(capsys, "downtime", "end", "1")
    assert rc == 2 and "downtime #1 already ended at" in err


def test_stop_and_resume(config, capsys):
    rc, out, _ = run(capsys, "stop", "--frontend", "cms", "--reason", "budget exhausted")
    assert rc == 0 and "no launches at frontend cms until resumed" in out
    now = time.time()
    assert controls.launch_hold(state.store(), EAST, "cms", now) == "stopped: budget exhausted"
    assert controls.launch_hold(state.store(), EAST, None, now) is None  # other frontends still launch there
    rc, out, _ = run(capsys, "downtime", "list")
    assert "no downtime" in out  # a stop is listed with --all
    assert "#1 stop ACTIVE frontend cms" in run(capsys, "downtime", "list", "--all")[1]
    rc, _, err = run(capsys, "resume", "--entry", EAST)
    assert rc == 2 and f"no stop in effect on entry {EAST}" in err
    rc, out, _ = run(capsys, "resume", "--frontend", "cms")
    assert rc == 0 and "ended stop #1" in out
    assert controls.launch_hold(state.store(), EAST, "cms") is None
