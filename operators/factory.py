"""The factory's operators: requests in, the cycle's plan, launches.

Only the factory talks to resource providers, through the entry's
middleware hook. Decisions are the pure functions of
``airflow_glidein.provisioning`` and ``airflow_glidein.lifecycle``; these
operators do the I/O around them. Inventory, reaping and the report are in
``lifecycle.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_glidein import lifecycle as L
from airflow_glidein import controls, metrics, pilotdb, provisioning, state
from airflow_glidein import pilots as P
from airflow_glidein.assets import GLIDEIN_REQUESTS, REQUEST_EVENTS_WINDOW
from airflow_glidein.bootstrap.launches import userdata_for
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from airflow_glidein.hooks.base import LaunchPending, describe_error
from airflow_glidein.operators.base import GlideinBaseOperator
from airflow_glidein.operators.lifecycle import (
    as_pilot,
    merged_errors,
    merged_quotas,
    removed_entries,
    tag_policy,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class CollectRequestsOperator(GlideinBaseOperator):
    """The newest unexpired request of every frontend, from ``glidein_requests`` events."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("inlets", [GLIDEIN_REQUESTS])
        super().__init__(**kwargs)

    def execute(self, context: Context) -> dict[str, dict]:
        accessor = context["inlet_events"][GLIDEIN_REQUESTS]
        events = [
            {"extra": ev.extra, "timestamp": ev.timestamp.timestamp()}
            for ev in accessor[-REQUEST_EVENTS_WINDOW:]
        ]
        requests = provisioning.latest_requests(events, self.config, self.now())
        for name, req in sorted(requests.items()):
            self.log.info("Request of %s (cycle %s): %s", name, req.get("cycle"),
                          {e: p["idle"] for e, p in req["entries"].items()})
        return requests


class PlanCycleOperator(GlideinBaseOperator):
    """This cycle's decisions: the reaping actions, and what to launch per entry.

    Returns one launch work item per entry (mapped by submit_pilots) and
    pushes the reaping actions under the XCom key ``actions``. Pilots about
    to be terminated or retired are not counted as capacity; entries in
    backoff or whose listing failed get no launches.
    """

    template_fields: Sequence[str] = ("requests", "inventory", "config_file")

    def __init__(self, *, requests: Any, inventory: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests = requests
        self.inventory = inventory

    def execute(self, context: Context) -> list[dict[str, Any]]:
        cfg, now, store = self.config, self.now(), state.store()
        removed = removed_entries(cfg, store)  # their pilots are drained by their last settings
        by_key = pilotdb.load_pilots(store, [e.name for e in cfg.entries] + list(removed))
        rows = list(by_key.values())
        levels = {(e, key): int(ask["idle"]) for key, req in self.requests.items()
                  for e, ask in req.get("entries", {}).items()}
        downtimes = controls.load(store, now)
        # the operators' pilot requests and draining downtimes go through the same reap and verification
        asked, done = controls.pilot_actions(controls.pending(store), by_key)
        actions = controls.merge(L.reap(cfg, rows, levels, now, removed),
                                 controls.drain_actions(downtimes, rows, now) + asked)
        controls.settle(store, done, now)
        leaving = {a.key: (P.RETIRING if a.action == "retire" else P.TERMINATING) for a in actions}
        pilots = [as_pilot(r, leaving.get(P.pilot_key(r["entry"], r["id"]))) for r in rows]
        # created but not listed yet, nor recorded (a batch call answers with its first id only)
        grace = max((e.listing_grace for e in cfg.entries), default=0)
        pilots += provisioning.unlisted_pilots(
            pilotdb.unlisted_launches(store, [e.name for e in cfg.entries], now - grace), cfg, now)
        blocked = {e: f"listing failed this cycle ({err})" for e, err in merged_errors(self.inventory).items()}
        for e, h in pilotdb.load_health(store).items():
            # a backoff this very run set (a cleared run planning again) does not hold its own re-run back
            if h["until"] > now and e not in blocked and h.get("run_id") != context["run_id"]:
                blocked[e] = f"entry backoff: {h['reason']}, until {int(h['until'] - now)} s from now"
        holds = controls.entry_holds(downtimes, [e.name for e in cfg.entries], now)
        held = controls.pair_holds(downtimes, [(e.name, f.name) for e in cfg.entries for f in cfg.frontends], now)
        for where, why in sorted({**holds, **{f"{e} for {f}": w for (e, f), w in held.items()}}.items()):
            self.log.warning("No launches at %s: %s", where, why)
        blocked.update(holds)
        work = provisioning.plan_launches(cfg, self.requests, pilots, provisioning.run_key(context["run_id"]), blocked,
                                          now=now, quotas=merged_quotas(self.inventory), held=held)
        for item in work:
            n = sum(b["count"] for b in item["launches"])
            self.log.info("Entry %s: launch %d (bound by %s) %s", item["entry"], n, item["why"]["bound_by"], item["why"])
        for a in actions:
            self.log.info("%s %s at %s: %s", a.action, a.id, a.entry, a.reason)
        if any(p.state == P.REQUESTED and p.provider_state == "" for p in pilots):
            self.log.info("Counted as capacity while the listing catches up: %s", dict(Counter(
                p.entry for p in pilots if p.state == P.REQUESTED and p.provider_state == "")))
        context["ti"].xcom_push(key="actions", value=[a.to_dict() for a in actions])
        context["ti"].xcom_push(key="decisions", value={
            w["entry"]: {**w["why"], "launch": sum(b["count"] for b in w["launches"])} for w in work})
        return [w for w in work if w["launches"]]


class SubmitPilotsOperator(GlideinBaseOperator):
    """Launch one entry's batches, idempotently (check-before-create per launch id).

    Mapped per entry, so one entry's failure never stops the others; a retry
    repeats nothing, because every batch first counts what its launch id
    already made.
    """

    template_fields: Sequence[str] = ("work", "config_file")

    def __init__(self, *, work: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.work = work

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, store, run_id = self.config, state.store(), context["run_id"]
        entry = cfg.entry(self.work["entry"])
        launched, held = [], []
        for batch in self.work["launches"]:
            # a stop or downtime set since the plan (even between two batches) holds what is left: no provider call
            if why := controls.launch_hold(store, entry.name, batch["frontend"], self.now()):
                self.log.warning("Entry %s launch %s (%d pilots) not made: %s", entry.name, batch["launch_id"],
                                 batch["count"], why)
                held.append({"launch_id": batch["launch_id"], "count": batch["count"], "why": why})
                continue
            conn_id = cfg.credential(batch["provision"]).conn_id
            hook = pilot_hook(entry, cfg.factory.name, conn_id)
            tags = {P.TAG_FACTORY_RUN: run_id, **burst_tags(batch)}
            spec = LaunchSpec(
                launch_id=batch["launch_id"],
                frontend=batch["frontend"],
                count=batch["count"],
                image=batch["image"],
                request=batch["request"],
                extra_tags=tags,
                # registers the launch and its bootstrap token (issued now, on the factory's clock), then signs
                userdata=userdata_for(cfg, entry, batch, conn_id, now=self.now()),
            )
            record = pilotdb.LaunchLog(store, entry.name, spec.launch_id, self.now(), {
                "frontend": spec.frontend, "burst": batch.get("burst"), "request": spec.request,
                "factory_run": run_id, "conn": conn_id, "policy": tag_policy(tags)})
            try:
                result = hook.launch(spec, record)
            except LaunchPending as exc:  # not the entry's fault: no backoff, but the run shows it
                pilotdb.record_failure(store, run_id, entry.name, "launch", str(exc), self.now(), keep=True)
                raise
            except Exception as exc:
                launch_failed(entry.name, run_id, f"launch {spec.launch_id}: {describe_error(exc)}", self.now())
                metrics.incr(1, "failures", entry.name, "launch", entry=entry.name, kind="launch")
                raise
            metrics.incr(len(result["created"]), "launches", entry.name, entry=entry.name, frontend=spec.frontend)
            self.log.info("Entry %s launch %s: %d created, %d already there",
                          entry.name, spec.launch_id, len(result["created"]), len(result["existing"]))
            launched.append({"launch_id": spec.launch_id, "frontend": spec.frontend, **result})
        launch_succeeded(entry.name, run_id, self.now())
        return {"entry": entry.name, "launched": launched, **({"held": held} if held else {})}


LAUNCH_FAILED = "launch failed"


def launch_failed(entry: str, run_id: str, message: str, now: float) -> None:
    """A failed launch backs the entry off once per factory run: Airflow's retries of the same launch
    are one failure, not one doubling each (the retry may still succeed). The run's report names it."""
    store = state.store()
    pilotdb.record_failure(store, run_id, entry, "launch", message, now)
    health = pilotdb.load_health(store).get(entry, {})
    failures = health.get("failures", 0) + (0 if health.get("run_id") == run_id else 1)
    pilotdb.save_health(store, [{"entry": entry, "failures": failures, "until": L.backoff_until(failures, now),
                                 "reason": f"{LAUNCH_FAILED}: {message[:300]}", "updated": now, "run_id": run_id}])


def launch_succeeded(entry: str, run_id: str, now: float) -> None:
    """All of an entry's launches went through (a retry may follow a failed try): launch errors no
    longer hold it back, and this run's failure of it is forgotten."""
    store = state.store()
    pilotdb.clear_failure(store, run_id, entry, "launch")
    health = pilotdb.load_health(store).get(entry)
    if health and health["failures"] and str(health["reason"]).startswith(LAUNCH_FAILED):
        pilotdb.save_health(store, [{"entry": entry, "failures": 0, "until": now, "reason": "", "updated": now,
                                     "run_id": run_id}])


def burst_tags(batch: dict[str, Any]) -> dict[str, str]:
    """A burst's pilots carry its id and its own policy, so reaping can read them back."""
    if not batch.get("burst"):
        return {}
    return {P.TAG_BURST: str(batch["burst"]), P.TAG_MAX_LIFETIME: str(int(batch["policy"]["max_lifetime"])),
            P.TAG_IDLE_TIMEOUT: str(int(batch["policy"]["idle_timeout"]))}
