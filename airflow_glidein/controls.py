"""Operator controls: downtimes, the stop switch and pilot actions (state store and pure logic).

A downtime, as in glideinWMS, covers an entry, a frontend, an entry for one
frontend, or the whole factory ("" is every entry / every frontend), for a
scheduled window or open-ended. While it lasts the factory launches nothing
there and calls no provider for it, frontends plan elsewhere ("downtime:
<reason>"), and its pilots keep running or, with ``drain``, are retired
(their startds stop accepting jobs). A stop is an open-ended downtime that
starts now: the same row, kind "stop", ended by ``resume``. The submit checks
both before each provider call, so either takes effect mid-run. Nothing here
terminates a pilot by itself (glideinWMS #282): terminating many is a manual
pilot action, which the page records here and the factory's reap carries out.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, Column, Float, Integer, String, Table, Text, insert, or_, select, update

from airflow_glidein import pilots as P
from airflow_glidein.lifecycle import Action, Memory
from airflow_glidein.state import METADATA, StateStore

DOWNTIME, STOP = "downtime", "stop"
RETIRE, TERMINATE = "retire", "terminate"
PILOT_ACTIONS = (RETIRE, TERMINATE)
HISTORY_ROWS = 20

DOWNTIMES = Table(
    "glidein_downtimes",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # downtime | stop
    Column("entry", String(64), nullable=False, default=""),  # "": every entry
    Column("frontend", String(64), nullable=False, default=""),  # "": every frontend
    Column("start_time", Float, nullable=False),
    Column("end_time", Float, index=True),  # NULL: until ended
    Column("drain", Boolean, nullable=False, default=False),  # retire its pilots while it lasts
    Column("reason", Text, nullable=False),
    Column("who", String(256), nullable=False),
    Column("ended_by", String(256)),
)
ACTIONS = Table(
    "glidein_operator_actions",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("who", String(256), nullable=False),
    Column("action", String(32), nullable=False),  # retire | terminate | downtime | stop | end downtime | resume
    Column("entry", String(64), nullable=False, default=""),
    Column("frontend", String(64), nullable=False, default=""),
    Column("pilots", Text),  # JSON list of pilot ids at the entry (retire / terminate), else NULL
    Column("reason", Text, nullable=False, default=""),
    Column("outcome", Text, nullable=False, default=""),  # e.g. the factory run it triggered
    Column("done", Float, index=True),  # a pilot action: when the reap had taken every pilot; NULL: pending
)


class ControlError(ValueError):
    """Bad operator input; the message says which value and why."""


@dataclass(frozen=True)
class Downtime:
    id: int
    kind: str
    entry: str
    frontend: str
    start: float
    end: float | None
    drain: bool
    reason: str
    who: str

    def active(self, now: float) -> bool:
        return self.start <= now and (self.end is None or now < self.end)

    def covers(self, entry: str, frontend: str | None) -> bool:
        """Whether it holds launches at ``entry`` for ``frontend`` (None: for every frontend, i.e. entry-wide)."""
        return self.entry in ("", entry) and (self.frontend == "" or self.frontend == frontend)

    @property
    def label(self) -> str:
        return f"{'downtime' if self.kind == DOWNTIME else 'stopped'}: {self.reason}"

    @property
    def scope(self) -> str:
        return scope_name(self.entry, self.frontend)


def scope_name(entry: str, frontend: str) -> str:
    if entry and frontend:
        return f"entry {entry} for frontend {frontend}"
    return f"entry {entry}" if entry else f"frontend {frontend}" if frontend else "the whole factory"


# -- pure decisions -------------------------------------------------------------------------------

def hold(downtimes: Iterable[Downtime], entry: str, frontend: str | None, now: float) -> str | None:
    """Why launches at ``entry`` for ``frontend`` are held now ("downtime: ...", "stopped: ..."), or None."""
    for d in downtimes:
        if d.active(now) and d.covers(entry, frontend):
            return d.label
    return None


def entry_holds(downtimes: list[Downtime], entries: Iterable[str], now: float) -> dict[str, str]:
    """Entries held for every frontend: the factory blocks them like a backed-off entry."""
    return {e: why for e in entries if (why := hold(downtimes, e, None, now))}


def pair_holds(downtimes: list[Downtime], pairs: Iterable[tuple[str, str]], now: float) -> dict[tuple[str, str], str]:
    """(entry, frontend) pairs held: the factory launches nothing there for that frontend."""
    return {(e, f): why for e, f in pairs if (why := hold(downtimes, e, f, now))}


def drain_actions(downtimes: list[Downtime], rows: Iterable[Mapping[str, Any]], now: float) -> list[Action]:
    """Retire the registered pilots a draining downtime covers (once: the reap remembers the request)."""
    draining = [d for d in downtimes if d.drain and d.active(now)]
    out = []
    for r in rows:
        if r["state"] not in (P.IDLE, P.BUSY) or Memory.from_dict(r.get("memory")).retire_requested is not None:
            continue
        d = next((d for d in draining if d.covers(r["entry"], r.get("frontend"))), None)
        if d is not None:
            out.append(Action(r["id"], r["entry"], RETIRE, f"{d.label} (draining {d.scope}, by {d.who})"))
    return out


def pilot_actions(requests: Iterable[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[list[Action], list[int]]:
    """The reaping actions the operators' pending pilot requests still need, and the requests now carried
    out (every pilot gone, terminating, or retired as asked). Through the reap: the same verified path."""
    actions, done = [], []
    for req in requests:
        waiting = False
        for pid in req["pilots"]:
            row = rows.get(P.pilot_key(req["entry"], pid))
            if row is None or row["state"] in (P.TERMINATED, P.TERMINATING, P.STUCK):
                continue  # gone, or on the termination ladder (verified, escalated, reported)
            mem = Memory.from_dict(row.get("memory"))
            if req["action"] == TERMINATE and mem.terminate_requested is None:
                why = f"terminated by {req['who']}: {req['reason']}"
            elif req["action"] == RETIRE and mem.retire_requested is None and mem.terminate_requested is None:
                why = f"retired by {req['who']}: {req['reason']}"
            else:
                continue
            waiting = True
            actions.append(Action(pid, req["entry"], req["action"], why))
        if not waiting:
            done.append(req["id"])
    return actions, done


def merge(policy: list[Action], operator: list[Action]) -> list[Action]:
    """The policy's actions plus the operators'; an operator's terminate replaces a policy retire."""
    by_key = {a.key: a for a in policy}
    for a in operator:
        if a.key not in by_key or (a.action == TERMINATE and by_key[a.key].action == RETIRE):
            by_key[a.key] = a
    return list(by_key.values())


RELATIVE = re.compile(r"^\+(\d+)([smhd])$")


def parse_time(text: str | None, now: float, field: str) -> float | None:
    """``now``, ``+90m`` / ``+2h`` / ``+1d``, or an ISO 8601 time (UTC unless it says); "" / None: None."""
    text = (text or "").strip()
    if not text:
        return None
    if text == "now":
        return now
    if m := RELATIVE.match(text):
        return now + int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ControlError(f"{field} {text!r} is not a time: give 'now', '+2h' (s, m, h, d) or ISO 8601 "
                           "like 2026-12-05T06:00 (UTC)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def check_scope(entry: str, frontend: str, entries: Iterable[str], frontends: Iterable[str]) -> None:
    if entry and entry not in set(entries):
        raise ControlError(f"entry {entry!r} is not in the configuration (entries: {', '.join(sorted(entries))})")
    if frontend and frontend not in set(frontends):
        raise ControlError(f"frontend {frontend!r} is not in the configuration "
                           f"(frontends: {', '.join(sorted(frontends))})")


# -- the state store ------------------------------------------------------------------------------

def _downtime(r: Mapping[str, Any]) -> Downtime:
    return Downtime(r["id"], r["kind"], r["entry"], r["frontend"], r["start_time"], r["end_time"], bool(r["drain"]),
                    r["reason"], r["who"])


def load(store: StateStore, now: float, kind: str | None = None) -> list[Downtime]:
    """Downtimes and stops in effect or still to come (ended ones are history: ``record``)."""
    q = select(DOWNTIMES).where(or_(DOWNTIMES.c.end_time.is_(None), DOWNTIMES.c.end_time > now))
    if kind:
        q = q.where(DOWNTIMES.c.kind == kind)
    with store.begin() as conn:
        return [_downtime(r) for r in conn.execute(q.order_by(DOWNTIMES.c.start_time, DOWNTIMES.c.id)).mappings()]


def launch_hold(store: StateStore, entry: str, frontend: str | None, now: float | None = None) -> str | None:
    """Why launches at ``entry`` for ``frontend`` must not happen now (the submit asks before each call)."""
    now = time.time() if now is None else now
    return hold(load(store, now), entry, frontend, now)


def add(store: StateStore, kind: str, entry: str, frontend: str, start: float, end: float | None, reason: str,
        who: str, now: float, drain: bool = False) -> int:
    """A new downtime or stop (recorded in the history too); its id."""
    reason = reason.strip()
    if not reason:
        raise ControlError(f"a {kind} needs a reason (--reason): the page and the plans show it")
    if end is not None and end <= max(start, now):
        raise ControlError(f"end {iso(end)} is not after the start ({iso(max(start, now))})")
    with store.begin() as conn:
        did = conn.execute(insert(DOWNTIMES).values(
            kind=kind, entry=entry, frontend=frontend, start_time=start, end_time=end, drain=drain, reason=reason,
            who=who)).inserted_primary_key[0]
        window = f"from {iso(start)} " + (f"to {iso(end)}" if end else "until ended") + (", draining" if drain else "")
        _record(conn, who, kind, entry, frontend, None, reason, f"#{did} {window}", now, done=now)
    return int(did)


def end(store: StateStore, did: int, who: str, now: float) -> Downtime:
    """End a downtime or stop now (one not started yet is cancelled); the ended row."""
    with store.begin() as conn:
        row = conn.execute(select(DOWNTIMES).where(DOWNTIMES.c.id == did)).mappings().first()
        if row is None:
            raise ControlError(f"no downtime or stop #{did}")
        d = _downtime(row)
        if d.end is not None and d.end <= now:
            raise ControlError(f"{d.kind} #{did} already ended at {iso(d.end)}")
        conn.execute(update(DOWNTIMES).where(DOWNTIMES.c.id == did)
                     .values(end_time=now, start_time=min(d.start, now), ended_by=who))
        _record(conn, who, "resume" if d.kind == STOP else "end downtime", d.entry, d.frontend, None, d.reason,
                f"#{did} ended", now, done=now)
    return d


def resume(store: StateStore, entry: str, frontend: str, who: str, now: float) -> list[Downtime]:
    """End the stops on exactly this scope; the ones ended."""
    stops = [d for d in load(store, now, STOP) if (d.entry, d.frontend) == (entry, frontend) and d.active(now)]
    if not stops:
        raise ControlError(f"no stop in effect on {scope_name(entry, frontend)}")
    return [end(store, d.id, who, now) for d in stops]


def _record(conn: Any, who: str, action: str, entry: str, frontend: str, pilots: list[str] | None, reason: str,
            outcome: str, now: float, done: float | None = None) -> int:
    return int(conn.execute(insert(ACTIONS).values(
        at=now, who=who, action=action, entry=entry, frontend=frontend,
        pilots=None if pilots is None else json.dumps(pilots), reason=reason, outcome=outcome, done=done,
    )).inserted_primary_key[0])


def request_pilots(store: StateStore, action: str, entry: str, pilots: list[str], reason: str, who: str,
                   now: float) -> int:
    """Ask the factory to retire or terminate these pilots of ``entry`` (its next reap does it)."""
    if action not in PILOT_ACTIONS:
        raise ControlError(f"pilot action {action!r}: only {' or '.join(PILOT_ACTIONS)}")
    if not reason.strip():
        raise ControlError(f"to {action} pilots give a reason: the history shows who did what and why")
    with store.begin() as conn:
        return _record(conn, who, action, entry, "", sorted(set(pilots)), reason.strip(), "requested", now)


def note_outcome(store: StateStore, aid: int, outcome: str) -> None:
    with store.begin() as conn:
        conn.execute(update(ACTIONS).where(ACTIONS.c.id == aid).values(outcome=outcome))


def pending(store: StateStore) -> list[dict[str, Any]]:
    """Pilot requests the reap has not carried out yet."""
    with store.begin() as conn:
        rows = conn.execute(select(ACTIONS).where(ACTIONS.c.done.is_(None), ACTIONS.c.action.in_(PILOT_ACTIONS))
                            .order_by(ACTIONS.c.id)).mappings()
        return [{**r, "pilots": json.loads(r["pilots"] or "[]")} for r in rows]


def settle(store: StateStore, ids: list[int], now: float) -> None:
    if ids:
        with store.begin() as conn:
            conn.execute(update(ACTIONS).where(ACTIONS.c.id.in_(ids)).values(done=now))


def recent(store: StateStore, limit: int = HISTORY_ROWS) -> list[dict[str, Any]]:
    """The newest operator actions, newest first (the page's history)."""
    with store.begin() as conn:
        rows = conn.execute(select(ACTIONS).order_by(ACTIONS.c.at.desc(), ACTIONS.c.id.desc()).limit(limit))
        return [{**r, "pilots": json.loads(r["pilots"]) if r["pilots"] else None} for r in rows.mappings()]


def iso(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
