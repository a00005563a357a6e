"""Pilot records and states (docs/architecture.md, "Pilot identity").

A pilot is one provisioned resource; its id is the provider's id qualified by
entry. Its state comes from what the provider and the collector say now.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Pilot states
REQUESTED = "requested"
BOOTING = "booting"
IDLE = "idle"  # registered, unclaimed
BUSY = "busy"  # registered, running jobs
RETIRING = "retiring"
TERMINATING = "terminating"
TERMINATED = "terminated"
BOOT_FAILED = "boot_failed"
LOST = "lost"
STOPPED = "stopped"
STUCK = "stuck"
ORPHAN = "orphan"

STATES = (REQUESTED, BOOTING, IDLE, BUSY, RETIRING, TERMINATING, TERMINATED,
          BOOT_FAILED, LOST, STOPPED, STUCK, ORPHAN)
CAPACITY = (REQUESTED, BOOTING, IDLE)  # what the factory subtracts from a requested level
ACTIVE = CAPACITY + (BUSY, RETIRING)  # what counts against a frontend's max running
LIVE = tuple(s for s in STATES if s != TERMINATED)  # holds quota at the provider (entry/factory limits)

# Provider states, as every hook normalises them
P_PENDING, P_RUNNING, P_STOPPING, P_STOPPED = "pending", "running", "stopping", "stopped"
P_TERMINATING, P_TERMINATED, P_ERROR = "terminating", "terminated", "error"

# Tags every pilot carries at its provider
TAG_FACTORY = "glidein:factory"
TAG_FRONTEND = "glidein:frontend"
TAG_ENTRY = "glidein:entry"
TAG_LAUNCH = "glidein:launch"
TAG_REQUEST = "glidein:request"
TAG_FACTORY_RUN = "glidein:factory_run"  # the factory DAG run that launched it
TAG_BURST = "glidein:burst"  # only on pilots of an ad-hoc burst: the burst's id
TAG_MAX_LIFETIME = "glidein:max_lifetime"  # a burst's own pilot policy, read back by reaping
TAG_IDLE_TIMEOUT = "glidein:idle_timeout"


def pilot_key(entry: str, pid: str) -> str:
    """A pilot's identity: its provider id qualified by entry. Provider ids collide across endpoints
    (OpenNebula numbers VMs from 0 at every endpoint, schedds number cluster.proc from 1)."""
    return f"{entry}/{pid}"


def split_key(key: str) -> tuple[str, str]:
    """(entry, provider id) of a pilot key; entry names never hold a slash."""
    entry, _, pid = key.partition("/")
    return entry, pid


def start_of(started: float | None, launched: float, queued: bool) -> float | None:
    """When a pilot's boot timeout and lifetime began: where pilots wait in a queue (``queued``: grid
    jobs), its start at the site, None while it is still queued; elsewhere its launch (a VM boots then)."""
    if started is not None:
        return started
    return None if queued else launched


def request_key(frontend: str | None, burst: str | None) -> str:
    """Whose request a pilot serves: its frontend's, or a burst's (which counts its own pilots)."""
    return f"burst-{burst}" if burst else (frontend or "-")


@dataclass
class ProviderInstance:
    """One instance as a hook lists it."""

    id: str
    state: str  # one of the P_* states
    launched: float  # epoch seconds: when it was asked for (a grid job's submission)
    tags: dict[str, str] = field(default_factory=dict)
    detail: str = ""  # provider status text, fault message
    # when the site started it, where a pilot can wait in a queue first (a grid job's JobCurrentStartDate);
    # None: not started yet there, or a provider without queues (then it starts when launched)
    started: float | None = None
    aliases: tuple[str, ...] = ()  # other ids the pilot may give itself (an EC2 GAHP job's instance id)

    @property
    def launch_id(self) -> str | None:
        return self.tags.get(TAG_LAUNCH)


@dataclass
class Pilot:
    id: str
    entry: str
    frontend: str | None
    launch: str | None
    state: str
    launched: float
    provider_state: str
    detail: str = ""
    burst: str | None = None
    started: float | None = None  # see ProviderInstance.started

    @property
    def key(self) -> str:
        """Whose request it serves (see ``request_key``); its own identity is ``pilot_key``."""
        return request_key(self.frontend, self.burst)

    @property
    def pilot_key(self) -> str:
        return pilot_key(self.entry, self.id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pilot:
        return cls(**d)


def counts(pilots: Iterable[Pilot]) -> dict[str, dict[str, dict[str, int]]]:
    """{entry: {frontend or "burst-<id>": {state: n, "total": n}}}, for plans and reports."""
    out: dict[str, dict[str, Counter]] = {}
    for p in pilots:
        c = out.setdefault(p.entry, {}).setdefault(p.key, Counter())
        c[p.state] += 1
        if p.state in LIVE:
            c["total"] += 1
    return {e: {f: dict(c) for f, c in fes.items()} for e, fes in out.items()}
