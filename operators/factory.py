"""The factory's operators: requests in, inventory, launches, reaping, status out.

Only the factory talks to resource providers, through the entry's
middleware hook. Decisions are the pure functions of
``airflow_glidein.provisioning``; these operators do the I/O around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from airflow_glidein import pilots as P
from airflow_glidein import provisioning, report, userdata
from airflow_glidein.assets import GLIDEIN_REQUESTS, GLIDEIN_STATUS, REQUEST_EVENTS_WINDOW
from airflow_glidein.config import Config, Entry
from airflow_glidein.credentials import usable_on
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from airflow_glidein.hooks.htcondor import HTCondorHook
from airflow_glidein.operators.base import GlideinBaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

STARTD_ATTRS = ["GLIDEIN_PILOT_ID", "GLIDEIN_Entry_Name", "State", "Activity", "EnteredCurrentState", "Name"]


def provision_conns(config: Config, entry: Entry) -> list[str]:
    """Connection ids of every provisioning credential usable on the entry."""
    return sorted({c.conn_id for c in config.credentials if c.purpose == "provision" and usable_on(c, entry)})


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


class InventoryOperator(GlideinBaseOperator):
    """Our pilots at every entry: provider listing by tag, joined with the collector's startd ads."""

    def execute(self, context: Context) -> dict[str, Any]:
        cfg = self.config
        frontends = [f.name for f in cfg.frontends]
        startds = self._startds()
        pilots: list[dict] = []
        errors: dict[str, str] = {}
        for entry in cfg.entries:
            seen: set[str] = set()
            for conn_id in provision_conns(cfg, entry):
                try:
                    listed = pilot_hook(entry, cfg.factory.name, conn_id).list_pilots()
                except Exception as exc:  # one entry's provider down must not stop the others
                    self.log.warning("Entry %s: listing with %s failed: %s", entry.name, conn_id, exc)
                    errors[entry.name] = str(exc)[:300]
                    continue
                for inst in listed:
                    if inst.id in seen:
                        continue
                    seen.add(inst.id)
                    pilot = P.observe(inst, entry.name, frontends, startds.get(inst.id) if startds is not None else None)
                    pilots.append({**pilot.to_dict(), "conn": conn_id})
        counts = P.counts(P.Pilot.from_dict({k: v for k, v in p.items() if k != "conn"}) for p in pilots)
        self.log.info("Pilots per entry and state:\n%s", report.pilots_table(counts))
        return {"pilots": pilots, "errors": errors, "collector": startds is not None}

    def _startds(self) -> dict[str, dict] | None:
        collector = self.config.factory.collector
        if not collector:
            self.log.info("No collector configured: registration is not observed; pilots count as booting")
            return None
        ads = HTCondorHook(collector=collector).query_startds(
            f'GLIDEIN_Factory == "{self.config.factory.name}"', STARTD_ATTRS
        )
        return {str(ad["GLIDEIN_PILOT_ID"]): ad for ad in ads if "GLIDEIN_PILOT_ID" in ad}


def _items(seq: Any) -> list:
    """A mapped task's results; indexing by length avoids probing past the end."""
    return [seq[i] for i in range(len(seq))] if seq else []


def _pilots(inventory: dict[str, Any]) -> list[P.Pilot]:
    return [P.Pilot.from_dict({k: v for k, v in p.items() if k != "conn"}) for p in inventory["pilots"]]


class PlanCycleOperator(GlideinBaseOperator):
    """This cycle's decisions: what to terminate, and what to launch per entry.

    Returns one launch work item per entry (mapped by submit_pilots) and
    pushes the terminations under the XCom key ``terminations``. Pilots that
    are about to be terminated are not counted as capacity.
    """

    template_fields: Sequence[str] = ("requests", "inventory", "config_file")

    def __init__(self, *, requests: Any, inventory: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests = requests
        self.inventory = inventory

    def execute(self, context: Context) -> list[dict[str, Any]]:
        pilots = _pilots(self.inventory)
        terminations = provisioning.reap(self.config, pilots, self.now())
        going = {d["id"] for d in terminations}
        for p in pilots:
            if p.id in going:
                p.state = P.TERMINATING
        # An entry we could not list is not launched on: we cannot subtract what we cannot see.
        blocked = {e: "listing failed" for e in self.inventory.get("errors", {})}
        work = provisioning.plan_launches(
            self.config, self.requests, pilots, provisioning.run_key(context["run_id"]), blocked, now=self.now()
        )
        for item in work:
            n = sum(b["count"] for b in item["launches"])
            self.log.info("Entry %s: launch %d (bound by %s) %s", item["entry"], n, item["why"]["bound_by"], item["why"])
        for d in terminations:
            self.log.info("Terminate %s at %s: %s", d["id"], d["entry"], d["reason"])
        context["ti"].xcom_push(key="terminations", value=terminations)
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
        cfg = self.config
        entry = cfg.entry(self.work["entry"])
        launched = []
        for batch in self.work["launches"]:
            conn_id = cfg.credential(batch["provision"]).conn_id
            hook = pilot_hook(entry, cfg.factory.name, conn_id)
            spec = LaunchSpec(
                launch_id=batch["launch_id"],
                frontend=batch["frontend"],
                count=batch["count"],
                image=batch["image"],
                request=batch["request"],
                userdata=userdata.build(entry.middleware, {
                    "factory": cfg.factory.name,
                    "entry": entry.name,
                    "frontend": batch["frontend"],
                    "launch_id": batch["launch_id"],
                    "bootstrap_url": cfg.factory.bootstrap_url,
                    "policy": batch["policy"],
                }),
            )
            result = hook.launch(spec)
            self.log.info("Entry %s launch %s: %d created, %d already there",
                          entry.name, spec.launch_id, len(result["created"]), len(result["existing"]))
            launched.append({"launch_id": spec.launch_id, "frontend": spec.frontend, **result})
        return {"entry": entry.name, "launched": launched}


class ReapPilotsOperator(GlideinBaseOperator):
    """Carry out the cycle's terminations (past max lifetime, stopped), entry by entry."""

    template_fields: Sequence[str] = ("terminations", "inventory", "config_file")

    def __init__(self, *, terminations: Any, inventory: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.terminations = terminations
        self.inventory = inventory

    def execute(self, context: Context) -> list[dict[str, str]]:
        cfg = self.config
        conn_of = {p["id"]: p["conn"] for p in self.inventory["pilots"]}
        done, failed = [], []
        by_target: dict[tuple[str, str], list[dict]] = {}
        for d in self.terminations or []:
            by_target.setdefault((d["entry"], conn_of[d["id"]]), []).append(d)
        for (entry_name, conn_id), items in sorted(by_target.items()):
            try:
                pilot_hook(cfg.entry(entry_name), cfg.factory.name, conn_id).terminate([d["id"] for d in items])
                done += items
            except Exception as exc:
                self.log.warning("Entry %s: terminate failed: %s", entry_name, exc)
                failed += items
        for d in done:
            self.log.info("Terminated %s at %s: %s", d["id"], d["entry"], d["reason"])
        if failed:
            raise AirflowException(f"terminate failed for {len(failed)} pilots: {[d['id'] for d in failed]}")
        return done


class FactoryReportOperator(GlideinBaseOperator):
    """Publish pilot counts per entry/frontend/state on ``glidein_status`` and print the summary."""

    template_fields: Sequence[str] = ("inventory", "submitted", "reaped", "config_file")

    def __init__(self, *, inventory: Any, submitted: Any, reaped: Any, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [GLIDEIN_STATUS])
        super().__init__(**kwargs)
        self.inventory = inventory
        self.submitted = submitted
        self.reaped = reaped

    def execute(self, context: Context) -> dict[str, Any]:
        pilots = {p.id: p for p in _pilots(self.inventory or {"pilots": []})}
        for d in self.reaped or []:
            if d["id"] in pilots:
                pilots[d["id"]].state = P.TERMINATING
        now = self.now()
        launched = 0
        for item in _items(self.submitted):
            for batch in item["launched"]:
                for iid in batch["created"]:
                    launched += 1
                    pilots[iid] = P.Pilot(iid, item["entry"], batch["frontend"], batch["launch_id"],
                                          P.REQUESTED, now, P.P_PENDING)
        counts = P.counts(pilots.values())
        status = {
            "factory": self.config.factory.name,
            "pilots": counts,
            "launched": launched,
            "terminated": len(self.reaped or []),
            "errors": (self.inventory or {}).get("errors", {}),
        }
        context["outlet_events"][GLIDEIN_STATUS].extra = status
        self.log.info("Factory %s after this cycle (%d launched, %d terminated):\n%s",
                      status["factory"], launched, status["terminated"], report.pilots_table(counts))
        return status
