"""The pilot lifecycle as pure functions: state transitions and the reaping policy.

A pilot's state is a function of (what we remembered, what the provider
lists, what the collector says, the time). Memory holds only what neither
the provider nor the collector can tell again: that a pilot once registered
(so its vanished startd means *lost*, not *booting*), when we asked it to
retire, and our termination attempts (so a VM that will not go is escalated
and reported *stuck*, never silently dropped or counted as capacity).

Termination ladder: terminate; after the entry's ``policy.terminate_deadline``
terminate again; after another, the middleware's force variant (force-delete,
terminate-hard); still there: *stuck*, forced again every cycle and reported.
A VM the provider itself started to terminate (EC2 shutting-down, Nova
deleting, OpenNebula EPILOG) climbs the same ladder from when it was first
seen so: a termination that stalls at the provider is a leak like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from airflow_glidein import middlewares
from airflow_glidein import pilots as P
from airflow_glidein.config import Config, Entry

TERMINATE_DEADLINE = 300  # s a provider gets to make a terminated VM disappear (policy.terminate_deadline)
PROVIDER_TERMINATING = "the provider is terminating it (not asked by the factory)"
FORCE_AFTER = 2  # attempts before the force variant is used
LOST_GRACE = 600  # s a vanished startd may stay away before its VM is terminated
SCALE_DOWN_GRACE = 300  # s a registered pilot must idle before scale-down may take it


@dataclass(frozen=True)
class Memory:
    """What the factory remembers of a pilot between cycles (state store)."""

    first_registered: float | None = None
    last_registered: float | None = None
    last_busy: float | None = None  # last cycle it ran a job: a partitionable slot's clock does not say
    retire_requested: float | None = None
    terminate_requested: float | None = None
    terminate_attempts: int = 0
    terminate_reason: str = ""
    stuck_since: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Memory:
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Observation:
    """One pilot as seen this cycle."""

    provider_state: str | None  # a P.P_* state, or None: not in the provider's listing
    launched: float
    known: bool  # tagged with a configured frontend and entry
    startd: Mapping[str, Any] | None = None  # its startd ad, if the collector has one
    collector: bool = True  # False: no collector configured, registration cannot be seen
    started: float | None = None  # when the site started it (a queued grid job: None until then)


def transition(mem: Memory, obs: Observation, now: float, boot_timeout: float,
               deadline: float = TERMINATE_DEADLINE, queue_timeout: float | None = None) -> tuple[str, Memory]:
    """The pilot's state now, and the updated memory.

    ``queue_timeout`` is set where pilots wait in a queue before the site starts them (grid jobs):
    queued is not booting, so the boot timeout runs from the start, and a pilot never started within
    ``queue_timeout`` of its launch has failed too.
    """
    if obs.startd is not None:
        mem = replace(mem, first_registered=mem.first_registered or now, last_registered=now)
    ps = obs.provider_state
    if ps is None or ps == P.P_TERMINATED:
        return P.TERMINATED, mem
    if mem.terminate_requested is not None:
        if mem.stuck_since is not None or (
            mem.terminate_attempts > FORCE_AFTER and now - mem.terminate_requested > deadline
        ):
            return P.STUCK, replace(mem, stuck_since=mem.stuck_since or now)
        return P.TERMINATING, mem
    if ps == P.P_TERMINATING:  # not asked by us: watched from now on, like our own terminations
        return P.TERMINATING, replace(mem, terminate_requested=now, terminate_reason=PROVIDER_TERMINATING)
    if ps in (P.P_STOPPING, P.P_STOPPED):
        return P.STOPPED, mem
    if ps == P.P_ERROR:
        return P.BOOT_FAILED, mem
    if not obs.known:
        return P.ORPHAN, mem
    if obs.startd is not None:
        activity = str(obs.startd.get("State", ""))
        if activity == "Claimed":
            mem = replace(mem, last_busy=now)
        if mem.retire_requested is not None or activity in ("Drained", "Preempting"):
            return P.RETIRING, mem
        return (P.BUSY if activity == "Claimed" else P.IDLE), mem
    if not obs.collector:
        return P.BOOTING, mem
    if mem.first_registered is not None:
        return P.LOST, mem
    start = P.start_of(obs.started, obs.launched, queue_timeout is not None)
    if start is None:  # queued at the site
        return (P.BOOT_FAILED if now - obs.launched > queue_timeout else P.BOOTING), mem
    if now - start > boot_timeout:
        return P.BOOT_FAILED, mem
    return P.BOOTING, mem


_SLOT_RANK = {"Drained": 3, "Preempting": 3, "Claimed": 2}  # a slot in a higher state decides the pilot's


def ad_pilot_key(ad: Mapping[str, Any]) -> str | None:
    """The pilot key a startd ad names: GLIDEIN_PILOT_ID is "entry/id"; a pilot started before ids
    were qualified says the bare id, qualified here by its GLIDEIN_Entry_Name (until it ages out)."""
    pid = ad.get("GLIDEIN_PILOT_ID")
    if pid is None:
        return None
    pid = str(pid)
    if "/" in pid:
        return pid
    entry = ad.get("GLIDEIN_Entry_Name")
    return P.pilot_key(str(entry), pid) if entry is not None else None


def pilot_ads(ads: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """One startd ad per pilot (by its pilot key, ``ad_pilot_key``) from its slot ads.

    A pilot with a partitionable slot advertises it (Unclaimed while it has
    resources left, however busy the pilot) and one dynamic slot per claim.
    The pilot is retiring if any slot drains, else busy if any slot is
    Claimed, else idle since its latest slot changed state: never idle, and
    so never reaped as idle, while one job runs.
    """
    out: dict[str, Mapping[str, Any]] = {}
    for ad in ads:
        key = ad_pilot_key(ad)
        if key is None:
            continue
        prev = out.get(key)
        if prev is None or _slot_key(ad) > _slot_key(prev):
            out[key] = ad
    return out


def _slot_key(ad: Mapping[str, Any]) -> tuple[int, float]:
    since = ad.get("EnteredCurrentState")
    return _SLOT_RANK.get(str(ad.get("State", "")), 0), float(since) if isinstance(since, (int, float)) else 0.0


def backed_off(status: Mapping[str, Any], now: float) -> dict[str, str]:
    """Entries the factory's status reports in backoff at ``now``, with the reason (the frontend plans elsewhere)."""
    out = {}
    for entry, b in (status.get("backoff") or {}).items():
        until = float(b.get("until", 0))
        if until > now:
            out[entry] = (f"entry backed off by the factory for another {int(until - now)} s "
                          f"({b.get('failures', 0)} failures: {b.get('reason') or 'unknown'})")
    return out


@dataclass(frozen=True)
class Action:
    id: str  # the provider's id
    entry: str
    action: str  # "terminate" | "force_terminate" | "retire"
    reason: str

    @property
    def key(self) -> str:
        return P.pilot_key(self.entry, self.id)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _idle_for(startd: Mapping[str, Any] | None, now: float, mem: Memory = Memory()) -> float:
    """Seconds the pilot has been idle: since its slot became Unclaimed, or since we last saw it run a
    job if later. A partitionable slot stays Unclaimed from boot however many jobs its dynamic slots
    ran, so its EnteredCurrentState alone would make a pilot whose last job just ended look idle for
    hours (and reap it before the next negotiation cycle could give it work)."""
    if not startd or startd.get("State") != "Unclaimed":
        return 0.0
    since = startd.get("EnteredCurrentState")
    if not isinstance(since, (int, float)):
        return 0.0
    return now - max(float(since), mem.last_busy or 0.0)


def reap(
    config: Config,
    pilots: Iterable[Mapping[str, Any]],
    levels: Mapping[tuple[str, str], int],
    now: float,
    removed: Mapping[str, Entry] | None = None,
) -> list[Action]:
    """What to do with each pilot this cycle.

    ``pilots`` are rows with id, entry, frontend, burst, policy (a burst's own),
    state, launched, startd (or None) and memory; ``levels`` maps (entry,
    request key: frontend or "burst-<id>") to the idle level currently
    requested (absent: 0, no request means no demand); ``removed`` holds the
    last settings of entries taken out of the configuration (their pilots are
    orphans, drained by those settings).
    Busy pilots are never taken for scale-down, only retired past their
    lifetime; orphans are drained unless idle or past their lifetime
    (never an automatic "remove everything", glideinWMS #282).
    """
    entries = {**(removed or {}), **{e.name: e for e in config.entries}}
    actions: list[Action] = []
    idle_by_group: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for p in pilots:
        pid, state, entry = p["id"], p["state"], entries.get(p["entry"])
        mem = Memory.from_dict(p.get("memory"))
        if entry is None or state == P.TERMINATED:
            continue
        policy = config.policy_for(entry, p.get("frontend"))
        if p.get("policy"):  # a burst's pilots follow the burst's own lifetime and idle timeout
            policy = policy.model_copy(update=p["policy"])
        start = P.start_of(p.get("started"), p["launched"], middlewares.get(entry.middleware).queued)
        age = now - start if start is not None else 0.0  # its lifetime runs from its start
        startd = p.get("startd")

        def act(kind: str, reason: str) -> None:
            actions.append(Action(pid, entry.name, kind, reason))

        if state in (P.TERMINATING, P.STUCK):
            if mem.terminate_requested is None or now - mem.terminate_requested <= policy.terminate_deadline:
                continue  # give the provider its time
            kind = "force_terminate" if mem.terminate_attempts >= FORCE_AFTER else "terminate"
            act(kind, f"still present {int(now - mem.terminate_requested)} s after terminate attempt "
                      f"{mem.terminate_attempts} ({mem.terminate_reason or 'reaped'})")
        elif state == P.STOPPED:
            act("terminate", "stopped at the provider, still holding quota")
        elif state == P.BOOT_FAILED:
            act("terminate", "provider reports an error" if p.get("provider_state") == P.P_ERROR else
                f"not started by the site within queue_timeout ({policy.queue_timeout} s)" if start is None else
                f"did not register within boot_timeout ({policy.boot_timeout} s)")
        elif state == P.LOST:
            away = now - (mem.last_registered or now)
            if away > LOST_GRACE:
                act("terminate", f"startd gone from the collector for {int(away)} s, VM still running")
        elif age > policy.max_lifetime:
            if state in (P.BUSY, P.RETIRING) or (state == P.ORPHAN and startd and startd.get("State") == "Claimed"):
                if mem.retire_requested is None:
                    act("retire", f"past max_lifetime ({int(age)} s > {policy.max_lifetime} s); letting jobs finish")
                elif now - mem.retire_requested > policy.retire_window:
                    act("terminate", f"retire_window ({policy.retire_window} s) over after max_lifetime")
            else:
                act("terminate", f"past max_lifetime ({int(age)} s > {policy.max_lifetime} s)")
        elif state == P.ORPHAN:
            if startd is None:
                if start is None:
                    act("terminate", "orphan (unknown frontend or entry), still queued at the site")
                elif age > policy.boot_timeout:
                    act("terminate", "orphan (unknown frontend or entry) never registered")
            elif startd.get("State") == "Unclaimed":
                act("terminate", "orphan (unknown frontend or entry), idle")
            elif mem.retire_requested is None:
                act("retire", "orphan (unknown frontend or entry), busy: draining")
        elif state == P.IDLE:
            idle = _idle_for(startd, now, mem)
            if idle > policy.idle_timeout:
                act("terminate", f"idle for {int(idle)} s > idle_timeout ({policy.idle_timeout} s)")
            elif idle > SCALE_DOWN_GRACE:
                idle_by_group.setdefault((entry.name, P.request_key(p.get("frontend"), p.get("burst"))), []).append(
                    (idle, pid))
    # Scale down: idle pilots beyond what the frontend asks for, longest idle first.
    taken = {a.key for a in actions}
    for (entry_name, fe), idle in idle_by_group.items():
        excess = len(idle) - levels.get((entry_name, fe), 0)
        for seconds, pid in sorted(idle, reverse=True)[: max(excess, 0)]:
            if P.pilot_key(entry_name, pid) not in taken:
                actions.append(Action(pid, entry_name, "terminate",
                                      f"scale-down: idle {int(seconds)} s, demand at {entry_name} fell"))
    return actions


def backoff_until(failures: int, now: float, base: float = 60.0, cap: float = 3600.0) -> float:
    """Exponential entry backoff, as Kubernetes cluster-autoscaler does for node groups."""
    if failures <= 0:
        return now
    return now + min(cap, base * 2 ** (failures - 1))
