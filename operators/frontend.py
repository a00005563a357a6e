"""The frontend's operators: query demand, select credentials, plan, publish the request.

A frontend never calls a provider: its only output is a request (a level per
entry) published as an event on the ``glidein_requests`` asset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from airflow_glidein import credentials as creds
from airflow_glidein import controls, demand, history, lifecycle, material, metrics, planning, report, secrets, state
from airflow_glidein.assets import GLIDEIN_REQUESTS, GLIDEIN_STATUS
from airflow_glidein.hooks.htcondor import HTCondorHook
from airflow_glidein.operators.base import GlideinBaseOperator
from airflow_glidein.pilots import CAPACITY, request_key

if TYPE_CHECKING:
    from airflow.sdk import Context


class QueryDemandOperator(GlideinBaseOperator):
    """Idle and running jobs of a frontend, grouped and matched against its entries.

    Returns (XCom) the job groups with the entries each matches, a summary,
    and the schedds that did not answer.
    """

    template_fields: Sequence[str] = ("frontend", "config_file")

    def __init__(self, *, frontend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frontend = frontend

    def execute(self, context: Context) -> dict[str, Any]:
        fe = self.config.frontend(self.frontend)
        hook = HTCondorHook(collector=fe.demand.collector)
        groups, missing, matcher = demand.frontend_demand(self.config, fe.name, hook, self.log)
        summary = demand.summarize(groups)
        self.log.info(
            "Frontend %s: %d idle and %d running jobs in %d groups (%d ClassAd evaluations); "
            "%d idle jobs match no entry",
            fe.name, summary["idle"], summary["running"], summary["groups"], matcher.evaluations,
            summary["idle_unmatched"],
        )
        return {"groups": [g.to_dict() for g in groups], "summary": summary, "missing_schedds": missing}


class SelectCredentialsOperator(GlideinBaseOperator):
    """Per entry of the frontend, the provisioning and pilot credential ids to use (ids only).

    Reads every credential of the frontend from its Airflow connection (masking
    its secrets), refuses the missing, malformed, expired and short-lived ones
    with a warning naming each, and picks by trust domain, auth method and
    remaining lifetime; ties rotate across cycles (the state store keeps the
    position). An entry left without a credential is skipped with the reason.
    """

    template_fields: Sequence[str] = ("frontend", "config_file")

    def __init__(self, *, frontend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frontend = frontend

    def execute(self, context: Context) -> dict[str, dict]:
        cfg = self.config
        fe = cfg.frontend(self.frontend)
        validity = secrets.check(cfg, fe.credentials, self.now())
        for cid, v in sorted(validity.items()):
            cred = cfg.credential(cid)
            if v.ok:
                self.log.info("Credential %s (%s, trust domain %s, %s): %s",
                              cid, cred.type, cred.trust_domain, cred.purpose, material.describe(v))
            else:
                self.log.warning("Credential %s (%s, connection %s) is skipped this cycle: %s",
                                 cid, cred.type, cred.conn_id, v.reason)
        cycle = context["run_id"]
        last = self._rotation(lambda store: creds.load_rotation(store, fe.name)) or {}
        choice = creds.select(cfg, fe.name, validity, last, cycle)
        self._rotation(lambda store: creds.save_rotation(
            store, fe.name, {e: c for e, c in choice.items() if "skip" not in c}, cycle))
        for name in creds.ignored_vo_image(cfg, fe.name):
            self.log.info("Frontend %s: entry %s does not allow a VO image; it keeps its own image %s, not %s",
                          fe.name, name, cfg.entry(name).image, fe.vo_image)
        for name, c in sorted(choice.items()):
            if "skip" in c:
                self.log.warning("Frontend %s leaves entry %s out of this cycle: %s", fe.name, name, c["skip"])
                continue
            for cid, why in c.pop("refused", {}).items():
                if validity[cid].ok:  # the unreadable ones were named above
                    self.log.warning("Entry %s: credential %s passed over: %s", name, cid, why)
            self.log.info("Entry %s: provision with %s, pilots join with %s%s", name, c["provision"], c["pilot"],
                          f", VO image {c['image']}" if "image" in c else "")
        return choice

    def _rotation(self, step: Any) -> Any:
        """Run a step on the state store; without it, selection still works (no rotation)."""
        try:
            return step(state.store())
        except Exception as exc:
            self.log.warning("State store unavailable, credentials do not rotate this cycle: %s", exc)
            return None


class StatusPlanningOperator(GlideinBaseOperator):
    """Base of the operators that plan a frontend's request with the factory's latest status
    (``glidein_status``: pilot counts, entry backoff), read as the task's inlet."""

    def __init__(self, *, frontend: str, credentials: Any, **kwargs: Any) -> None:
        kwargs.setdefault("inlets", [GLIDEIN_STATUS])
        super().__init__(**kwargs)
        self.frontend = frontend
        self.credentials = credentials

    def _status(self, context: Context) -> dict[str, Any]:
        """The factory's latest status event.

        A status older than this frontend's request_ttl is not trusted: the
        plan then counts no pilots (the factory still subtracts what it sees)
        and no backoff (the factory still holds launches back).
        """
        try:
            events = context["inlet_events"][GLIDEIN_STATUS]
            latest = events[-1] if len(events) else None
        except (KeyError, IndexError):
            latest = None
        status = (latest.extra or {}) if latest is not None else {}
        if latest is not None and getattr(latest, "timestamp", None) is not None:
            age = self.now() - latest.timestamp.timestamp()
            if age > self.config.frontend(self.frontend).request_ttl:
                self.log.warning("The factory's last status is %d s old; planning as if no pilots ran", age)
                status = {}
        return status

    def _usable(self, status: dict[str, Any]) -> dict[str, Any]:
        """The credential selection with the entries the factory backed off, or in a downtime or stop for
        this frontend, marked unusable this cycle, like an entry without a credential: the plan's share of
        them goes to the other entries."""
        credentials = dict(self.credentials)
        now = self.now()
        downtimes = controls.load(state.store(), now)
        held = {e: why for e in credentials if (why := controls.hold(downtimes, e, self.frontend, now))}
        for entry, why in sorted({**lifecycle.backed_off(status, now), **held}.items()):
            if "skip" not in credentials.get(entry, {"skip": "not selected"}):
                self.log.warning("Frontend %s leaves entry %s out of this cycle: %s", self.frontend, entry, why)
                credentials[entry] = {"skip": why}
        return credentials


class PlanPilotsOperator(StatusPlanningOperator):
    """glideinWMS-style plan: a level of idle pilots per entry, each number with its reason."""

    template_fields: Sequence[str] = ("frontend", "demand", "credentials", "config_file")

    def __init__(self, *, frontend: str, demand: Any, credentials: Any, **kwargs: Any) -> None:
        super().__init__(frontend=frontend, credentials=credentials, **kwargs)
        self.demand = demand

    def execute(self, context: Context) -> dict[str, Any]:
        groups = [demand.JobGroup.from_dict(g) for g in self.demand["groups"]]
        status = self._status(context)
        request = planning.plan_frontend(self.config, self.frontend, groups, self._usable(status),
                                         self._my_pilots(status))
        request["missing_schedds"] = self.demand.get("missing_schedds", [])
        request["demand"] = self.demand.get("summary", {})
        self.log.info("%s", report.plan_table(request))
        return request

    def _my_pilots(self, status: dict[str, Any]) -> dict[str, dict[str, int]]:
        """This frontend's pilots per entry, from the factory's status."""
        out = {}
        for entry, fes in (status.get("pilots") or {}).items():
            c = fes.get(self.frontend) or {}
            out[entry] = {
                "booting": sum(c.get(s, 0) for s in CAPACITY if s != "idle"),
                "idle": c.get("idle", 0),
                "busy": c.get("busy", 0),
                "total": c.get("total", 0),
            }
        return out


class PublishRequestOperator(GlideinBaseOperator):
    """Publish the plan as this frontend's request: an event on ``glidein_requests``."""

    template_fields: Sequence[str] = ("frontend", "request", "config_file")

    def __init__(self, *, frontend: str, request: Any, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [GLIDEIN_REQUESTS])
        super().__init__(**kwargs)
        self.frontend = frontend
        self.request = request

    def execute(self, context: Context) -> dict[str, Any]:
        fe = self.config.frontend(self.frontend)
        request = {
            **self.request,
            "cycle": context["run_id"],
            "ttl": self.request.get("ttl") or fe.request_ttl,  # a burst brings its own lifetime
        }
        summary = request.pop("demand", None) or {}
        levels = {e: p["idle"] for e, p in request["entries"].items()}
        if not request.get("burst"):
            metrics.gauge(summary.get("idle_unmatched", 0), "demand", "unmatched", fe.name, frontend=fe.name)
            for e, p in request["entries"].items():
                jobs = p.get("why", {}).get("idle_jobs", 0)
                metrics.gauge(jobs, "demand", "idle_jobs", fe.name, e, frontend=fe.name, entry=e)
                metrics.gauge(p["idle"], "request", "level", fe.name, e, frontend=fe.name, entry=e)
        if request.pop("dry_run", False):
            raise AirflowSkipException(f"dry run: not publishing {levels}")
        context["outlet_events"][GLIDEIN_REQUESTS].extra = request
        history.record_request(request_key(fe.name, request.get("burst")), request, self.now())  # the charts
        who = f"Burst {request['burst']} of frontend {fe.name}" if request.get("burst") else f"Frontend {fe.name}"
        self.log.info("%s requests idle pilot levels %s", who, levels)
        return {"cycle": request["cycle"], "levels": levels, "skipped": request["skipped"]}
