"""Frontend planning: how many idle pilots each entry should hold (a level).

Follows glideinWMS's frontend: a job group that matches k usable entries
counts 1/k toward each, so a job is not provisioned k times; the share is
turned into pilots by the group's own resource requests (cores, memory,
GPUs) against the entry's pilot size; frontend limits cap the result. Every
number says which limit bound it. The factory subtracts pilots that already
boot or idle, and applies the entry-wide limits across frontends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from airflow_glidein.config import Config
from airflow_glidein.demand import JobGroup

FRACTION_RUNNING = 1.15  # glideinWMS's head room of max_running over demand
EPS = 1e-9


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split an integer total in proportion to weights (largest remainder, ties by name)."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(math.floor(v + EPS)) for k, v in exact.items()}
    left = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def entry_shares(groups: list[JobGroup], usable: set[str]) -> dict[str, dict[str, float]]:
    """Fractional idle/running jobs and resources each usable entry is asked to serve."""
    shares: dict[str, dict[str, float]] = {
        e: {"idle_jobs": 0.0, "running_jobs": 0.0, "cores": 0.0, "memory_mb": 0.0, "gpus": 0.0, "groups": 0}
        for e in usable
    }
    for g in groups:
        targets = [e for e in g.entries if e in usable]
        if not targets:
            continue
        k = len(targets)
        for e in targets:
            s = shares[e]
            s["idle_jobs"] += g.idle / k
            s["running_jobs"] += g.running / k
            s["cores"] += g.idle * g.cpus / k
            s["memory_mb"] += g.idle * g.memory / k
            s["gpus"] += g.idle * g.gpus / k
            s["groups"] += 1
    return shares


def pilots_for(share: Mapping[str, float], cores: int, memory_mb: int, gpus: int) -> tuple[int, str]:
    """Pilots needed for a share, and which resource decided it."""
    need = {"cores": share["cores"] / cores, "memory_mb": share["memory_mb"] / memory_mb}
    if gpus:
        need["gpus"] = share["gpus"] / gpus
    elif share["gpus"] > 0:
        need["gpus"] = 0.0  # a GPU job matched a GPU-less entry: the match said so, honour cores/memory
    resource = max(need, key=lambda r: need[r])
    return math.ceil(need[resource] - EPS) if need[resource] > EPS else 0, resource


def _bind(candidates: list[tuple[int, str]]) -> tuple[int, str]:
    value, name = min(candidates, key=lambda c: c[0])
    return max(value, 0), name


def plan_frontend(
    config: Config,
    frontend: str,
    groups: list[JobGroup],
    credentials: Mapping[str, Mapping[str, Any]],
    pilots: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """The frontend's request: a level per entry, with the reasons.

    ``credentials`` is the selection per entry ({"provision", "pilot"} or
    {"skip"}); ``pilots`` is what the factory last reported of this
    frontend's pilots per entry ({"booting", "idle", "busy", "total"}).
    """
    fe = config.frontend(frontend)
    pilots = pilots or {}
    usable = {e for e in fe.entries if "skip" not in credentials.get(e, {"skip": "not selected"})}
    shares = entry_shares(groups, usable)
    plans: dict[str, dict[str, Any]] = {}
    for name in fe.entries:
        if name not in usable:
            continue
        entry = config.entry(name)
        counts = {s: int(pilots.get(name, {}).get(s, 0)) for s in ("booting", "idle", "busy", "total")}
        share = shares[name]
        wanted, resource = pilots_for(share, entry.cores, entry.memory_mb, entry.gpus)
        level, bound = _bind([
            (wanted, f"demand ({resource})"),
            (fe.limits.max_idle_per_entry, "frontend.max_idle_per_entry"),
            (fe.limits.max_running_per_entry - counts["busy"], "frontend.max_running_per_entry"),
        ])
        max_running = min(fe.limits.max_running_per_entry, int((level + counts["busy"]) * FRACTION_RUNNING + 1))
        plans[name] = {
            "idle": level,
            "max_running": max_running,
            "why": {
                "idle_jobs": round(share["idle_jobs"], 3),
                "running_jobs": round(share["running_jobs"], 3),
                "cores": round(share["cores"], 3),
                "memory_mb": round(share["memory_mb"], 3),
                "gpus": round(share["gpus"], 3),
                "pilot_size": {"cores": entry.cores, "memory_mb": entry.memory_mb, "gpus": entry.gpus},
                "wanted": wanted,
                "pilots": counts,
                "bound_by": bound,
            },
        }
    _cap_total(plans, fe.limits.max_idle, "frontend.max_idle")
    busy = sum(int(pilots.get(e, {}).get("busy", 0)) for e in fe.entries)
    _cap_total(plans, fe.limits.max_running - busy, "frontend.max_running")
    for name, plan in plans.items():
        plan.update(credentials[name])
    skipped = {e: credentials[e]["skip"] for e in fe.entries if e not in usable and e in credentials}
    return {
        "frontend": fe.name,
        "entries": plans,
        "skipped": skipped,
        "start_expr": fe.start_expr,
        "vo_image": fe.vo_image,
    }


def _cap_total(plans: dict[str, dict[str, Any]], cap: int, name: str) -> None:
    """Scale levels down in proportion when their sum exceeds a frontend-wide cap."""
    total = sum(p["idle"] for p in plans.values())
    cap = max(cap, 0)
    if total <= cap:
        return
    new = apportion(cap, {e: p["idle"] for e, p in plans.items()})
    for e, p in plans.items():
        if new[e] < p["idle"]:
            p["idle"] = new[e]
            p["why"]["bound_by"] = name
