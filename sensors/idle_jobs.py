"""A sensor on demand: wait until a frontend's matching idle jobs reach a threshold.

Deferrable by default (``IdleJobsTrigger`` waits in the triggerer); poke and
reschedule modes use the same check, ``matching_idle``. The same trigger,
without a deadline, is the asset watcher that starts a frontend as soon as
demand appears (dags/glidein_frontends.py, the frontend's ``watch``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

from airflow_glidein import demand
from airflow_glidein.config import get_config
from airflow_glidein.hooks.htcondor import HTCondorHook
from airflow_glidein.sensors.base import GlideinSensor

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)


def matching_idle(config_file: str | None, frontend: str, entries: list[str] | None = None) -> dict[str, Any]:
    """The frontend's idle jobs that match ``entries`` (default: all of its entries), from its demand source.

    {"frontend", "idle": jobs matching at least one of the entries, "per_entry": {entry: jobs},
    "unmatched": idle jobs matching none of the frontend's entries, "missing_schedds": [...]}
    """
    cfg = get_config(config_file)
    fe = cfg.frontend(frontend)
    wanted = list(entries or fe.entries)
    groups, missing, _ = demand.frontend_demand(cfg, fe.name, HTCondorHook(collector=fe.demand.collector), log)
    return {
        "frontend": fe.name,
        "idle": sum(g.idle for g in groups if set(g.entries) & set(wanted)),
        "per_entry": {e: sum(g.idle for g in groups if e in g.entries) for e in wanted},
        "unmatched": sum(g.idle for g in groups if not g.entries),
        "missing_schedds": missing,
    }


class IdleJobsSensor(GlideinSensor):
    """Succeeds when at least ``threshold`` idle jobs of ``frontend`` match its entries (or ``entries``).

    :param frontend: the frontend whose demand source and match are used (templated).
    :param threshold: matching idle jobs to wait for.
    :param entries: count only jobs matching one of these entries (default: all of the frontend's).
    :param config_file: the glidein configuration (default ``[glidein] config_file``).
    :param deferrable: wait in the triggerer (default True).
    :param poll_interval: seconds between demand queries (each asks every schedd of the frontend).

    Returns (XCom) the count: {"frontend", "idle", "per_entry", "unmatched", "missing_schedds"}.
    """

    template_fields: Sequence[str] = ("frontend", "entries", "config_file")
    ui_color = "#e8f0fd"

    def __init__(
        self,
        *,
        frontend: str,
        threshold: int = 1,
        entries: list[str] | None = None,
        config_file: str | None = None,
        deferrable: bool = True,
        poll_interval: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(config_file=config_file, deferrable=deferrable, poll_interval=poll_interval, **kwargs)
        if not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be a positive number of jobs, not {threshold!r}")
        self.frontend = frontend
        self.threshold = threshold
        self.entries = entries

    def _check(self) -> dict[str, Any]:
        fe = get_config(self.config_file).frontend(self.frontend)  # a KeyError names an unknown frontend
        unknown = sorted(set(self.entries or []) - set(fe.entries))
        if unknown:
            raise AirflowException(f"Frontend {fe.name} has no entries {unknown}; its entries: {fe.entries}")
        return matching_idle(self.config_file, fe.name, self.entries)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        found = self._check()
        if found["idle"] >= self.threshold:
            return self._done(found)
        from airflow_glidein.sensors.triggers import IdleJobsTrigger

        self.defer_to(IdleJobsTrigger, frontend=self.frontend, threshold=self.threshold, entries=self.entries)

    def poke(self, context: Context) -> PokeReturnValue:
        found = self._check()
        if found["idle"] < self.threshold:
            self.log.info("Frontend %s: %d matching idle jobs, waiting for %d", self.frontend, found["idle"],
                          self.threshold)
            return PokeReturnValue(False)
        return PokeReturnValue(True, self._done(found))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") == "success":
            return self._done(event["demand"])
        if event.get("status") == "timeout":
            raise AirflowSensorTimeout(
                f"Frontend {self.frontend}: {event['demand']['idle']} matching idle jobs at the deadline, "
                f"fewer than {self.threshold}"
            )
        raise AirflowException(f"Reading the demand of frontend {self.frontend} failed: {event.get('message')}")

    def _done(self, found: dict[str, Any]) -> dict[str, Any]:
        self.log.info("Frontend %s: %d matching idle jobs (threshold %d) %s", self.frontend, found["idle"],
                      self.threshold, found["per_entry"])
        return found
