"""The HTCondor pool through the htcondor2 bindings: schedds (demand) and the collector (pilots).

The frontend reads idle jobs from schedds; the factory reads the startd ads
of registered pilots from the collector. Only the attributes asked for are
transferred (projection).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import classad2
import htcondor2

from airflow.sdk import BaseHook

log = logging.getLogger(__name__)


def ad_to_dict(ad: classad2.ClassAd, attrs: Iterable[str] | None = None) -> dict[str, Any]:
    """A ClassAd as plain values; expressions are evaluated in the ad, undefined left out."""
    out = {}
    for key in attrs if attrs is not None else ad.keys():
        if key not in ad:
            continue
        value = ad.eval(key)
        if isinstance(value, classad2.Value):
            continue  # undefined / error
        if isinstance(value, classad2.ClassAd):
            value = ad_to_dict(value)
        out[key] = value
    return out


class HTCondorHook(BaseHook):
    """Reach an HTCondor pool: ``collector`` is host[:port] (None: the local configuration)."""

    conn_name_attr = "htcondor_conn_id"
    default_conn_name = "htcondor_default"
    conn_type = "htcondor"
    hook_name = "HTCondor pool"

    def __init__(self, collector: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collector_address = collector

    @property
    def collector(self) -> htcondor2.Collector:
        return htcondor2.Collector(self.collector_address) if self.collector_address else htcondor2.Collector()

    def schedd_names(self, names: list[str]) -> list[str]:
        """The named schedds, or every schedd the collector knows."""
        if names:
            return list(names)
        ads = self.collector.locateAll(htcondor2.DaemonType.Schedd)
        return sorted(str(ad["Name"]) for ad in ads)

    def schedd(self, name: str) -> htcondor2.Schedd:
        location = self.collector.locate(htcondor2.DaemonType.Schedd, name)
        return htcondor2.Schedd(location)

    def query_jobs(self, schedd: str, constraint: str, projection: list[str]) -> list[dict[str, Any]]:
        ads = self.schedd(schedd).query(constraint=constraint, projection=projection)
        return [ad_to_dict(ad, projection) for ad in ads]

    def query_demand(self, schedd: str, constraint: str, attrs: list[str], old_before: int) -> dict[str, Any]:
        """A schedd's idle and running jobs, counted by the schedd where it can.

        First a GroupBy query: the schedd returns one ad per distinct value of
        ``attrs`` + JobStatus with its JobCount, plus a second one for the jobs
        idle since before ``old_before``. A schedd that refuses it is asked for
        the job ads themselves (projected to ``attrs``), grouped by the caller.
        A schedd too old to know GroupBy answers with job ads anyway; they
        carry no JobCount and count one each.
        """
        sd = self.schedd(schedd)
        projection = sorted(set(attrs) | {"JobStatus"})
        try:
            ads = sd.query(constraint=constraint, projection=projection, opts=htcondor2.QueryOpt.GroupBy)
            old = sd.query(
                constraint=f"({constraint}) && JobStatus == 1 && QDate <= {int(old_before)}",
                projection=projection,
                opts=htcondor2.QueryOpt.GroupBy,
            )
            keep = projection + ["JobCount"]
            return {"mode": "groupby", "ads": [ad_to_dict(a, keep) for a in ads], "old": [ad_to_dict(a, keep) for a in old]}
        except htcondor2.HTCondorException as exc:
            note = f"GroupBy refused ({exc}); grouped here"  # no logging: this may run in a forked child
        projection = sorted(set(projection) | {"QDate"})
        ads = sd.query(constraint=constraint, projection=projection)
        return {"mode": "jobs", "ads": [ad_to_dict(a, projection) for a in ads], "note": note}

    def query_startds(self, constraint: str, projection: list[str]) -> list[dict[str, Any]]:
        ads = self.collector.query(htcondor2.AdType.Startd, constraint=constraint, projection=projection)
        return [ad_to_dict(ad, projection) for ad in ads]

    def retire_startd(self, name: str) -> None:
        """Peaceful shutdown of one startd: its running jobs finish, then the pilot exits and powers off."""
        location = self.collector.locate(htcondor2.DaemonType.Startd, name)
        htcondor2.send_command(location, htcondor2.DaemonCommand.OffPeaceful)

    def test_connection(self) -> tuple[bool, str]:
        try:
            n = len(self.collector.query(htcondor2.AdType.Collector, projection=["Name"]))
            return True, f"collector answered ({n} collector ads)"
        except Exception as exc:
            return False, str(exc)

