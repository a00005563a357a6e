"""Demand: idle and running jobs, grouped by what matching reads.

As glideinWMS does, jobs that look the same to the match (same values of the
attributes the match expressions read, and the same resource requests) form
one group, and the match runs once per (group, entry).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_glidein import classads

IDLE, RUNNING = 1, 2
RESOURCE_ATTRS = ("RequestCpus", "RequestMemory", "RequestGPUs")
OLD_IDLE_SECONDS = 600  # glideinWMS: jobs idle this long count toward the idle reserve


@dataclass
class JobGroup:
    attrs: dict[str, Any]  # the values matching reads, Request* included
    idle: int = 0
    running: int = 0
    idle_old: int = 0
    entries: list[str] = field(default_factory=list)  # filled by matching

    @property
    def cpus(self) -> int:
        return _int(self.attrs.get("RequestCpus"), 1)

    @property
    def memory(self) -> int:
        return _int(self.attrs.get("RequestMemory"), 0)

    @property
    def gpus(self) -> int:
        return _int(self.attrs.get("RequestGPUs"), 0)

    def to_dict(self) -> dict:
        return {"attrs": self.attrs, "idle": self.idle, "running": self.running,
                "idle_old": self.idle_old, "entries": self.entries}

    @classmethod
    def from_dict(cls, d: Mapping) -> JobGroup:
        return cls(dict(d["attrs"]), d["idle"], d["running"], d.get("idle_old", 0), list(d.get("entries", [])))


def _int(value: Any, default: int) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return default  # an expression or undefined: the schedd's default applies


def match_attributes(match_expr: str, entries: Iterable) -> list[str]:
    """Job attributes the frontend's match and the entries' requirements read."""
    attrs = set(RESOURCE_ATTRS) | classads.refs(match_expr, "job")
    for entry in entries:
        if entry.requirements:
            attrs |= classads.refs(entry.requirements, "TARGET")
            attrs |= classads.bare_refs(entry.requirements, entry.machine_attrs())
    return sorted(attrs, key=str.lower)


def group_jobs(ads: Iterable[Mapping[str, Any]], attrs: list[str], now: float | None = None) -> list[JobGroup]:
    """Group job ads (idle and running only) by the values of ``attrs``."""
    now = time.time() if now is None else now
    groups: dict[tuple, JobGroup] = {}
    for ad in ads:
        status = ad.get("JobStatus")
        if status not in (IDLE, RUNNING):
            continue
        key = tuple(_hashable(ad.get(a)) for a in attrs)
        group = groups.get(key)
        if group is None:
            group = groups[key] = JobGroup({a: ad.get(a) for a in attrs if ad.get(a) is not None})
        if status == IDLE:
            group.idle += 1
            qdate = ad.get("QDate")
            if isinstance(qdate, (int, float)) and now - qdate >= OLD_IDLE_SECONDS:
                group.idle_old += 1
        else:
            group.running += 1
    return list(groups.values())


def group_autoclusters(ads: Iterable[Mapping[str, Any]], attrs: list[str]) -> list[JobGroup]:
    """Groups from ``condor_q -autocluster -json`` ads (JobCount idle jobs each)."""
    groups: dict[tuple, JobGroup] = {}
    for ad in ads:
        key = tuple(_hashable(ad.get(a)) for a in attrs)
        group = groups.setdefault(key, JobGroup({a: ad.get(a) for a in attrs if ad.get(a) is not None}))
        count = _int(ad.get("JobCount"), 0)
        group.idle += count
        group.idle_old += count  # an autocluster carries no queue dates: count all as settled demand
    return list(groups.values())


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def is_autocluster_output(ads: list[Mapping[str, Any]]) -> bool:
    return bool(ads) and "JobCount" in ads[0] and "JobStatus" not in ads[0]


def read_queue_file(path: str, attrs: list[str], now: float | None = None) -> list[JobGroup]:
    """Demand from a ``condor_q -json`` or ``condor_q -autocluster -json`` file."""
    try:
        with open(path, "rb") as fh:
            ads = json.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read queue file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"queue file {path} is not condor_q -json output: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(ads, list):
        raise ValueError(f"queue file {path} is not condor_q -json output: expected a list of job ads")
    if is_autocluster_output(ads):
        return group_autoclusters(ads, attrs)
    return group_jobs(ads, attrs, now)


def match_groups(groups: list[JobGroup], matcher: classads.Matcher) -> None:
    for group in groups:
        group.entries = matcher.matches(group.attrs)


def summarize(groups: list[JobGroup]) -> dict[str, Any]:
    return {
        "groups": len(groups),
        "idle": sum(g.idle for g in groups),
        "running": sum(g.running for g in groups),
        "idle_unmatched": sum(g.idle for g in groups if not g.entries),
    }


def collect(
    source: Any,
    attrs: list[str],
    schedd_names: Any,
    query_jobs: Any,
    log: Any,
) -> tuple[list[JobGroup], list[dict[str, str]]]:
    """Demand from a frontend's source; a schedd that fails is logged, skipped and reported.

    ``schedd_names(names)`` and ``query_jobs(schedd, constraint, projection)``
    are the pool's calls (HTCondorHook's in production).
    """
    if source.queue_file:
        return read_queue_file(source.queue_file, attrs), []
    constraint = f"({source.constraint}) && (JobStatus == {IDLE} || JobStatus == {RUNNING})"
    projection = sorted(set(attrs) | {"JobStatus", "QDate"})
    ads: list[Mapping[str, Any]] = []
    missing: list[dict[str, str]] = []
    names = schedd_names(source.schedds)
    for name in names:
        try:
            ads.extend(query_jobs(name, constraint, projection))
        except Exception as exc:  # one schedd down must not stop the cycle
            log.warning("Schedd %s did not answer (%s); planning without it", name, exc)
            missing.append({"schedd": name, "error": str(exc)[:300]})
    if names and len(missing) == len(names):
        raise RuntimeError(f"no schedd answered ({', '.join(m['schedd'] for m in missing)})")
    return group_jobs(ads, attrs), missing
