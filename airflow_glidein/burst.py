"""Ad-hoc backfill bursts: a manual request for N pilots (or cores) with their own lifetime.

A burst goes through the factory like a frontend's request (docs/architecture.md,
"Roles"): it is published on
``glidein_requests`` under its own key, holds its pilots for its lifetime
(the request's TTL), and its pilots carry the burst's id and policy in their
tags, so the factory reaps them by that policy like any others.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from airflow_glidein.config import Config
from airflow_glidein.planning import apportion

DEFAULTS = {"entries": [], "pilots": None, "cores": None, "lifetime_hours": 4.0, "idle_timeout_minutes": 20,
            "vo_image": None, "dry_run": False}


def burst_id(run_id: str) -> str:
    return "b" + hashlib.sha256(run_id.encode()).hexdigest()[:8]


def validate(config: Config, params: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a burst's parameters, each said plainly (empty: valid)."""
    p = {**DEFAULTS, **params}
    names = [f.name for f in config.frontends]
    if p.get("frontend") not in names:
        return [f"frontend {p.get('frontend')!r} is not configured (one of: {', '.join(names)})"]
    fe = config.frontend(p["frontend"])
    problems = []
    entries = list(p["entries"] or fe.entries)
    for name in entries:
        if name not in fe.entries:
            problems.append(f"entry {name!r} is not an entry of frontend {fe.name} ({', '.join(fe.entries)})")
    if (p["pilots"] is None) == (p["cores"] is None):
        problems.append("give either a number of pilots or a number of cores (exactly one)")
    for field in ("pilots", "cores"):
        if p[field] is not None and (not isinstance(p[field], int) or p[field] < 1):
            problems.append(f"{field} must be a whole number of at least 1")
    try:
        lifetime = float(p["lifetime_hours"]) * 3600
        idle = float(p["idle_timeout_minutes"]) * 60
    except (TypeError, ValueError):
        return problems + ["lifetime_hours and idle_timeout_minutes must be numbers"]
    if lifetime < 600:
        problems.append("lifetime_hours must be at least 10 minutes (0.17 h)")
    if idle < 60:
        problems.append("idle_timeout_minutes must be at least 1")
    for name in entries:
        if name not in fe.entries:
            continue
        entry = config.entry(name)
        cap = config.policy_for(entry, fe.name).max_lifetime
        if lifetime > cap:
            problems.append(f"lifetime {lifetime / 3600:g} h exceeds entry {name}'s max_lifetime ({cap / 3600:g} h)")
        if p["vo_image"] and not entry.allow_vo_image:
            problems.append(f"entry {name} does not allow a VO image (allow_vo_image is false)")
    return problems


def plan(config: Config, params: Mapping[str, Any], credentials: Mapping[str, Mapping], run_id: str) -> dict:
    """The burst's request: pilots split evenly over its usable entries, with the burst's own policy."""
    p = {**DEFAULTS, **params}
    fe = config.frontend(p["frontend"])
    entries = list(p["entries"] or fe.entries)
    usable = [e for e in entries if "skip" not in credentials.get(e, {"skip": "no credential selection"})]
    skipped = {e: credentials.get(e, {}).get("skip", "no credential selection") for e in entries if e not in usable}
    total = p["pilots"] if p["pilots"] is not None else p["cores"]
    shares = apportion(int(total), {e: 1.0 for e in usable})
    lifetime, idle = int(float(p["lifetime_hours"]) * 3600), int(float(p["idle_timeout_minutes"]) * 60)
    out_entries, policy = {}, {}
    for name in usable:
        entry = config.entry(name)
        n = shares[name] if p["pilots"] is not None else math.ceil(shares[name] / entry.cores)
        if n <= 0:
            continue
        ask = {k: v for k, v in credentials[name].items() if k in ("provision", "pilot")}
        if p["vo_image"]:
            ask["image"] = p["vo_image"]
        out_entries[name] = {
            **ask, "idle": n, "max_running": n,
            "why": {"idle_jobs": "-", "running_jobs": "-", "cores": n * entry.cores, "memory_mb": n * entry.memory_mb,
                    "gpus": n * entry.gpus, "wanted": n, "pilots": {"booting": 0, "idle": 0, "busy": 0, "total": 0},
                    "bound_by": "burst request (" + (f"{p['pilots']} pilots" if p["pilots"] is not None
                                                     else f"{p['cores']} cores") + ")"},
        }
        policy[name] = config.policy_for(entry, fe.name).model_copy(
            update={"max_lifetime": lifetime, "idle_timeout": idle}).model_dump()
    return {
        "frontend": fe.name,
        "burst": burst_id(run_id),
        "entries": out_entries,
        "skipped": skipped,
        "start_expr": fe.start_expr,
        "policy": policy,
        "ttl": lifetime,
        "dry_run": bool(p["dry_run"]),
    }
