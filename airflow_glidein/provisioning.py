"""The factory's launch decisions, as pure functions (reaping: lifecycle.py).

Requests are levels: the factory launches the requested idle level minus the
pilots that already boot or idle, within each frontend's max_running, then
applies the entry-wide limits across all frontends that use the entry, then
the factory-wide totals. Running the factory twice on the same request
launches nothing twice, because the second run subtracts the first's pilots.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from airflow_glidein import credentials, middlewares
from airflow_glidein import pilots as P
from airflow_glidein.config import Config
from airflow_glidein.planning import apportion


def latest_requests(events: Iterable[Mapping[str, Any]], config: Config, now: float) -> dict[str, dict]:
    """The newest unexpired request of every configured frontend, and every live burst.

    ``events`` are asset events as {"extra": request, "timestamp": epoch}, any
    order. Keyed by P.request_key: the frontend's name, or "burst-<id>".
    """
    known = {f.name: f for f in config.frontends}
    best: dict[str, dict] = {}
    for ev in events:
        req = ev.get("extra") or {}
        name = req.get("frontend")
        ts = float(ev.get("timestamp", 0))
        if name not in known:
            continue  # a removed frontend's request (or its burst's) is not acted on
        ttl = req.get("ttl") or known[name].request_ttl
        if now - ts > ttl:
            continue
        key = P.request_key(name, req.get("burst"))
        if key not in best or ts > best[key]["published"]:
            best[key] = {**req, "published": ts}
    return best


def launch_id(run_key: str, frontend: str, entry: str, batch: int, plan: str = "") -> str:
    """Names one provider call: the same in every retry of the same factory run with the same plan.

    ``plan`` digests what the run decided for this frontend at this entry: a
    cleared run that re-plans a smaller deficit (its first try made some
    pilots) gets new ids for the rest, instead of finding its first batch
    made and creating nothing; a retry of the same plan finds its own launches.
    """
    return f"{run_key}{'-' + plan if plan else ''}.{frontend}.{entry}.{batch}"


def plan_digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:6]


def unlisted_pilots(calls: Iterable[Mapping[str, Any]], config: Config, now: float) -> list[P.Pilot]:
    """Instances recent create calls made that neither the listing nor the record holds yet.

    ``calls`` are ``pilotdb.unlisted_launches`` rows ({entry, launch_id, frontend, burst, started,
    missing}). Within its entry's ``listing_grace`` each counts as a requested pilot: capacity, and
    quota against the limits, so the next cycle does not launch them again while the listing lags.
    """
    entries = {e.name: e for e in config.entries}
    out = []
    for c in calls:
        entry = entries.get(c["entry"])
        if entry is None or now - c["started"] >= entry.listing_grace:
            continue
        out += [P.Pilot(f"(unlisted {c['launch_id']} #{n})", entry.name, c.get("frontend"), c["launch_id"],
                        P.REQUESTED, c["started"], "", "created, not listed yet", burst=c.get("burst"))
                for n in range(int(c["missing"]))]
    return out


def run_key(run_id: str) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:10]


def plan_launches(
    config: Config,
    requests: Mapping[str, Mapping[str, Any]],
    pilots: Iterable[P.Pilot],
    key: str,
    blocked: Mapping[str, str] | None = None,
    now: float | None = None,
    quotas: Iterable[Mapping[str, Any]] = (),
    held: Mapping[tuple[str, str], str] | None = None,
) -> list[dict[str, Any]]:
    """Per entry with something to launch: its batches and the reasoning.

    ``blocked`` holds entries back for everyone (backoff, a failed listing, a
    downtime); ``held`` holds (entry, frontend) pairs (a frontend's downtime
    or stop there): that frontend's ask gets nothing and says why.

    ``quotas`` is the provider's headroom per quota scope ({"entries",
    "headroom": {"instances", "cores", "memory_mb"}}): the entries of a scope
    share it, in configuration order, so no launch is refused for quota.

    With ``now``, a pilot with less lifetime left than the policy's
    min_idle_lifetime is no capacity (it cannot run the jobs it is counted
    for; glideinWMS #554 counted such slots and asked for nothing while they
    expired).
    """
    blocked, held = blocked or {}, held or {}
    pilots = list(pilots)
    entries = {e.name: e for e in config.entries}
    expiring = set()
    if now is not None:
        for p in pilots:
            if p.state in P.CAPACITY and p.entry in entries:
                entry = entries[p.entry]
                policy = config.policy_for(entry, p.frontend)
                start = P.start_of(p.started, p.launched, middlewares.get(entry.middleware).queued)
                if (now if start is None else start) + policy.max_lifetime - now < policy.min_idle_lifetime:
                    expiring.add(p.pilot_key)
    pilots = [p if p.pilot_key not in expiring else _not_capacity(p) for p in pilots]
    by_entry: dict[str, list[P.Pilot]] = {}
    for p in pilots:
        by_entry.setdefault(p.entry, []).append(p)
    g = config.factory.limits
    live_all = sum(p.state in P.LIVE for p in pilots)
    cap_all = sum(p.state in P.CAPACITY for p in pilots)
    global_room = max(0, min(g.max_pilots - live_all, g.max_idle - cap_all))
    headroom: dict[str, dict[str, int]] = {}  # entry -> its scope's headroom, one dict shared by the scope
    for q in quotas:
        shared = dict(q["headroom"])
        headroom.update((name, shared) for name in q["entries"])

    work = []
    for entry in config.entries:
        asks = {f: r["entries"][entry.name] for f, r in sorted(requests.items()) if entry.name in r.get("entries", {})}
        if not asks:
            continue
        here = by_entry.get(entry.name, [])
        why: dict[str, Any] = {"frontends": {}}
        deficits = {}
        for f, ask in asks.items():
            fe = requests[f].get("frontend", f)
            if refused := held.get((entry.name, fe)) or credentials.refuse_ask(config, entry, ask):
                deficits[f] = 0
                why["frontends"][f] = {"level": ask["idle"], "refused": refused}
                continue
            mine = [p for p in here if p.key == f]
            capacity = sum(p.state in P.CAPACITY for p in mine)
            active = sum(p.state in P.ACTIVE for p in mine)
            cap = ask.get("max_running")  # a request without one (a burst) is not capped here
            deficit = max(0, min(int(ask["idle"]) - capacity, (int(cap) - active) if cap is not None else math.inf))
            deficits[f] = deficit
            why["frontends"][f] = {"level": ask["idle"], "capacity": capacity, "active": active,
                                   "max_running": ask.get("max_running"), "deficit": deficit}
        lim = entry.limits
        live_e = sum(p.state in P.LIVE for p in here)
        cap_e = sum(p.state in P.CAPACITY for p in here)
        rooms = [
            (lim.max_pilots - live_e, "entry.max_pilots"),
            (lim.max_idle - cap_e, "entry.max_idle"),
            (lim.max_per_cycle, "entry.max_per_cycle"),
            (global_room, "factory.limits"),
        ]
        if entry.name in blocked:
            rooms.append((0, blocked[entry.name]))
        quota = headroom.get(entry.name)
        if quota is not None:
            rooms.append((pilots_within(quota, entry), f"provider quota ({', '.join(f'{k} {v}' for k, v in quota.items())} left)"))
        room, room_by = min(rooms, key=lambda r: r[0])
        room = max(room, 0)
        want = sum(deficits.values())
        alloc = deficits if want <= room else apportion(room, deficits)
        why["room"] = room
        why["bound_by"] = "demand" if want <= room else room_by
        global_room -= sum(alloc.values())
        if quota is not None:
            n = sum(alloc.values())
            for k, per in quota_units(entry).items():
                if k in quota:
                    quota[k] -= n * per
        launches = []
        for f, n in alloc.items():
            ask = asks[f]
            request = requests[f]
            image = credentials.image_for(entry, ask)
            plan = plan_digest(n, lim.batch_size, image, request.get("cycle", ""))
            for b in range(math.ceil(n / lim.batch_size)):
                count = min(lim.batch_size, n - b * lim.batch_size)
                launches.append({
                    "launch_id": launch_id(key, f, entry.name, b, plan),
                    "frontend": request.get("frontend", f),
                    "burst": request.get("burst"),
                    "count": count,
                    "request": str(request.get("cycle", "")),
                    "provision": ask.get("provision"),
                    "pilot": ask.get("pilot"),
                    "image": image,
                    "start_expr": request.get("start_expr", "true"),
                    "policy": (request.get("policy") or {}).get(entry.name)
                    or config.policy_for(entry, request.get("frontend", f)).model_dump(),
                })
        work.append({"entry": entry.name, "launches": launches, "why": why})
    return work


def quota_units(entry: Any) -> dict[str, int]:
    """What one pilot of this entry takes from each kind of provider quota."""
    return {"instances": 1, "cores": entry.cores, "memory_mb": entry.memory_mb}


def pilots_within(quota: Mapping[str, int], entry: Any) -> int:
    """Pilots of this entry the provider's headroom still takes."""
    per = quota_units(entry)
    return min((max(v, 0) // per[k] for k, v in quota.items() if k in per), default=math.inf)


def _not_capacity(p: P.Pilot) -> P.Pilot:
    return P.Pilot(**{**p.to_dict(), "state": P.RETIRING})
