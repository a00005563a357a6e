"""Frontend planning: how many idle pilots each entry should hold (a level).

Follows glideinWMS's frontend (glideinFrontendElement.compute_glidein_min_idle
and compute_glidein_max_run), in pilots rather than glideins:

- a job group that matches k usable entries counts 1/k toward each, so a job
  is not provisioned k times; where entries have a ``price``, the fractions
  follow HEPCloud's Decision Engine instead: in proportion to 1 / figure of
  merit, FOM = price per core-hour x (pilots + 1) / max_pilots (a full entry
  gets none, a free one is filled first);
- each group's share becomes pilots by its *own* request against the entry's
  pilot size (jobs per pilot = the fewest of cores, memory and GPUs that fit),
  summed over groups; glideinWMS scales an entry's average cores instead,
  which misjudges entries fed mixed single- and multi-core jobs;
- pilots already booting or idle at the entry (the factory's last status)
  count first: only what is still missing is added, within the per-entry
  limits, then attenuated (ramp-up), topped up with the reserve for jobs
  idle 10 minutes or more, halved once per curb reached, at least 1;
- frontend-wide limits cap the sum over entries.

The level published is pilots booting or idle wanted at the entry; the
factory launches level minus what it sees booting or idle, and applies the
entry-wide and factory-wide limits across frontends. Every number says which
limit bound it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from airflow_glidein.config import Config
from airflow_glidein.demand import JobGroup

EPS = 1e-9
RESOURCES = ("cores", "memory_mb", "gpus")


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


def jobs_per_pilot(job: tuple[int, int, int], pilot: tuple[int, int, int]) -> tuple[int, str]:
    """How many jobs of this size one pilot runs, and which resource decides (0: it does not fit)."""
    per = {}
    for name, want, have in zip(RESOURCES, job, pilot):
        if name == "cores":
            want = max(want, 1)
        if want > 0:
            per[name] = have // want
    resource = min(per, key=lambda r: (per[r], RESOURCES.index(r)))
    return per[resource], resource


def figures_of_merit(config: Config, usable: set[str], live: Mapping[str, int]) -> dict[str, float] | None:
    """HEPCloud's FOM per usable entry: price x (live pilots + 1) / max_pilots, inf when full.

    None when no entry has a price (shares are then equal, as in glideinWMS).
    An entry without a price beside priced ones counts as the dearest of them.
    """
    prices = {e: config.entry(e).price for e in usable}
    known = [p for p in prices.values() if p is not None]
    if not known:
        return None
    fom = {}
    for e, price in prices.items():
        cap, n = config.entry(e).limits.max_pilots, live.get(e, 0)
        fom[e] = math.inf if n >= cap else (max(known) if price is None else price) * (n + 1) / cap
    return fom


def _fractions(targets: list[str], fom: Mapping[str, float] | None) -> dict[str, float]:
    """How a job group matching ``targets`` is split among them (fractions summing to 1)."""
    if fom is not None:
        free = [e for e in targets if fom[e] == 0]
        if free:
            return {e: (1 / len(free) if e in free else 0.0) for e in targets}
        weights = {e: 1 / fom[e] for e in targets if fom[e] < math.inf}
        if weights:
            total = sum(weights.values())
            return {e: weights.get(e, 0.0) / total for e in targets}
    return {e: 1 / len(targets) for e in targets}  # no prices, or every target full: the limits say so


def entry_shares(
    groups: list[JobGroup], usable: set[str], sizes: Mapping[str, tuple[int, int, int]],
    fom: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fractional jobs, resources and pilots each usable entry is asked to serve."""
    shares: dict[str, dict[str, Any]] = {
        e: {"idle_jobs": 0.0, "idle_old_jobs": 0.0, "running_jobs": 0.0, "cores": 0.0, "memory_mb": 0.0,
            "gpus": 0.0, "pilots": 0.0, "pilots_old": 0.0, "by": dict.fromkeys(RESOURCES, 0.0), "groups": 0}
        for e in usable
    }
    for g in groups:
        targets = [e for e in g.entries if e in usable]
        if not targets:
            continue
        size = (g.cpus, g.memory, g.gpus)
        for e, f in _fractions(targets, fom).items():
            per, resource = jobs_per_pilot(size, sizes[e])
            if per <= 0 or f <= 0:
                continue  # matching already refuses jobs bigger than the pilot; never divide by zero
            s = shares[e]
            s["idle_jobs"] += g.idle * f
            s["idle_old_jobs"] += g.idle_old * f
            s["running_jobs"] += g.running * f
            s["cores"] += g.idle * max(size[0], 1) * f
            s["memory_mb"] += g.idle * size[1] * f
            s["gpus"] += g.idle * size[2] * f
            s["pilots"] += g.idle * f / per
            s["pilots_old"] += g.idle_old * f / per
            s["by"][resource] += g.idle * f / per
            s["groups"] += 1
    return shares


def _ceil(x: float) -> int:
    return math.ceil(x - EPS) if x > EPS else 0


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
    lim = fe.limits
    pilots = pilots or {}
    counts_of = {e: {s: int(c.get(s, 0)) for s in ("booting", "idle", "busy", "total")} for e, c in pilots.items()}
    total_have = sum(c["booting"] + c["idle"] for c in counts_of.values())
    total_live = total_have + sum(c["busy"] for c in counts_of.values())
    usable = {e for e in fe.entries if "skip" not in credentials.get(e, {"skip": "not selected"})}
    sizes = {e: (config.entry(e).cores, config.entry(e).memory_mb, config.entry(e).gpus) for e in usable}
    fom = figures_of_merit(config, usable, {e: c["total"] for e, c in counts_of.items()})
    shares = entry_shares(groups, usable, sizes, fom)
    plans: dict[str, dict[str, Any]] = {}
    for name in fe.entries:
        if name not in usable:
            continue
        counts = counts_of.get(name, {"booting": 0, "idle": 0, "busy": 0, "total": 0})
        share = shares[name]
        have = counts["booting"] + counts["idle"]
        live = have + counts["busy"]
        wanted, wanted_old = _ceil(share["pilots"]), _ceil(share["pilots_old"])
        resource = max(RESOURCES, key=lambda r: share["by"][r])
        missing, missing_old = max(wanted - have, 0), max(wanted_old - have, 0)
        limits = {
            "frontend.max_idle_per_entry": lim.max_idle_per_entry - have,
            "frontend.max_running_per_entry": lim.max_running_per_entry - live,
        }
        new, bound = _bind([(missing, f"demand ({resource})"), *((v, k) for k, v in limits.items())])
        add, curbs = new, []
        if new > 0:
            add = int(new / lim.ramp_up_attenuation) + min(missing_old // 3, lim.reserve_idle)
            add = min(add, new)  # the reserve tops up the attenuation; it never asks beyond demand or limits
            if add < new:
                curbs.append(f"ramp_up_attenuation {lim.ramp_up_attenuation:g}")
            for count, curb, label in (
                (have, lim.curb_idle_per_entry, "curb_idle_per_entry"),
                (total_have, lim.curb_idle, "curb_idle"),
                (total_live, lim.curb_running, "curb_running"),
            ):
                if count >= curb:
                    add /= 2
                    curbs.append(f"{label} ({count} >= {curb}: halved)")
            add = max(int(add), 1)
        if add < new:
            bound = curbs[-1].split(" (")[0] if len(curbs) == 1 else "curbs"
        level = min(have, wanted) + add
        max_running = counts["busy"]
        if wanted > 0:
            max_running = min(lim.max_running_per_entry, int((wanted + counts["busy"]) * lim.fraction_running + 1))
        plans[name] = {
            "idle": level,
            "max_running": max_running,
            "why": {
                "idle_jobs": round(share["idle_jobs"], 3),
                "idle_old_jobs": round(share["idle_old_jobs"], 3),
                "running_jobs": round(share["running_jobs"], 3),
                "cores": round(share["cores"], 3),
                "memory_mb": round(share["memory_mb"], 3),
                "gpus": round(share["gpus"], 3),
                "pilot_size": dict(zip(RESOURCES, sizes[name])),
                "pilots_exact": round(share["pilots"], 3),
                **({"fom": round(fom[name], 6) if fom[name] < math.inf else "full"} if fom else {}),
                "wanted": wanted,
                "pilots": counts,
                "add": add,
                "limits": limits,
                "curbs": curbs,
                "bound_by": bound,
            },
        }
    _cap_total(plans, lim.max_idle - total_have, "frontend.max_idle")
    _cap_total(plans, lim.max_running - total_live, "frontend.max_running")
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


def _cap_total(plans: dict[str, dict[str, Any]], room: int, name: str) -> None:
    """Scale this cycle's additions down in proportion when their sum exceeds a frontend-wide room."""
    total = sum(p["why"]["add"] for p in plans.values())
    room = max(room, 0)
    if total <= room:
        return
    new = apportion(room, {e: p["why"]["add"] for e, p in plans.items()})
    for e, p in plans.items():
        if new[e] < p["why"]["add"]:
            p["idle"] -= p["why"]["add"] - new[e]
            p["why"]["add"] = new[e]
            p["why"]["bound_by"] = name
