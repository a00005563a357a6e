"""A sensor on registration: wait until N pilots of a request, launch or burst have joined the pool.

A pilot has joined when a startd ad in the factory's collector carries its
key (GLIDEIN_PILOT_ID, "entry/provider id"; a bare id with GLIDEIN_Entry_Name
from pilots started before ids were qualified). Which pilots belong to the request comes from the
providers' listings, by the tags every pilot carries (glidein:request,
glidein:launch, glidein:burst), so pilots launched a moment ago count too;
the factory's pilot table adds its view (boot_failed, ...) and the pilots
that already left their provider, or registered once and have since left
the collector.
Deferrable by default (``PilotsJoinedTrigger``); poke and reschedule modes use
the same check, ``registration``. On timeout it fails naming each pilot that
never registered, its provider state and how long since its launch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

from airflow_glidein import lifecycle as L
from airflow_glidein import pilotdb, state
from airflow_glidein import pilots as P
from airflow_glidein.config import get_config
from airflow_glidein.hooks import pilot_hook
from airflow_glidein.hooks.htcondor import HTCondorHook
from airflow_glidein.operators.lifecycle import provision_conns
from airflow_glidein.sensors.base import GlideinSensor

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)
TAGS = {"request": P.TAG_REQUEST, "launch": P.TAG_LAUNCH, "burst": P.TAG_BURST}
STARTD_ATTRS = ["GLIDEIN_PILOT_ID", "GLIDEIN_Entry_Name", "Name", "State"]


def registration(config_file: str | None, kind: str, value: str, entries: list[str] | None = None) -> dict[str, Any]:
    """The pilots tagged ``kind`` = ``value`` at ``entries`` (default all), and which have joined the pool.

    Pilots come from the providers' listings and, for those a listing no
    longer shows (a VM that died while booting), from the factory's pilot
    table. {"pilots": n, "registered": [pilot keys], "waiting": [{"id" (key), "entry",
    "provider_state" ("gone": no longer listed), "state" (the factory's, or
    None), "since_launch", "detail"}] oldest first, "errors": {entry: listing
    error}}. One entry's listing failing is reported and the others still
    count; all of them failing is an error.
    """
    cfg = get_config(config_file)
    if not cfg.factory.collector:
        raise ValueError("factory.collector is not set: pilot registration cannot be observed")
    names = entries or [e.name for e in cfg.entries]
    unknown = sorted(set(names) - {e.name for e in cfg.entries})
    if unknown:
        raise ValueError(f"no entries {unknown} in the configuration")
    tag, now = TAGS[kind], time.time()
    pilots: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name in names:
        entry = cfg.entry(name)
        for conn_id in provision_conns(cfg, entry):
            try:
                for inst in pilot_hook(entry, cfg.factory.name, conn_id).list_pilots():
                    if inst.tags.get(tag) == value:
                        pilots.setdefault(P.pilot_key(name, inst.id), {
                            "id": P.pilot_key(name, inst.id), "entry": name, "provider_state": inst.state,
                            "state": None, "launched": inst.launched, "detail": inst.detail})
            except Exception as exc:
                log.warning("Entry %s: listing with connection %s failed: %s", name, conn_id, exc)
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if errors and len(errors) == len(names):
        raise RuntimeError(f"no entry could be listed: {errors}")
    table = _table(names, kind, value)
    for pid, row in table.items():
        # not in a good listing: gone; at an entry whose listing failed: as the factory last saw it
        seen = (row.get("provider_state") or "unknown") if row["entry"] in errors else "gone"
        known = pilots.setdefault(pid, {"id": pid, "entry": row["entry"], "provider_state": seen,
                                        "launched": row["launched"], "detail": row.get("detail") or ""})
        known["state"] = row["state"]
    ads = HTCondorHook(collector=cfg.factory.collector).query_startds(
        f'GLIDEIN_Factory == "{cfg.factory.name}"', STARTD_ATTRS)
    # joined: in the collector now, or seen there by the factory (it may have finished its work since)
    joined = set(L.pilot_ads(ads))
    joined |= {pid for pid, row in table.items() if (row.get("memory") or {}).get("first_registered")}
    waiting = sorted((p for pid, p in pilots.items() if pid not in joined), key=lambda p: p["launched"])
    return {
        "pilots": len(pilots),
        "registered": sorted(pid for pid in pilots if pid in joined),
        "waiting": [{**{k: v for k, v in p.items() if k != "launched"}, "since_launch": int(now - p["launched"])}
                    for p in waiting],
        "errors": errors,
    }


def _table(entries: list[str], kind: str, value: str) -> dict[str, dict[str, Any]]:
    """The factory's rows of these pilots (its state for each); without the state store, none."""
    try:
        rows = pilotdb.load_pilots(state.store(), entries)
    except Exception as exc:
        log.warning("State store unavailable, the factory's pilot states are left out: %s", exc)
        return {}
    return {pid: r for pid, r in rows.items() if r.get(kind) == value}


def describe_waiting(found: dict[str, Any], limit: int = 20) -> str:
    """The pilots that have not registered, one phrase each, for a failure message."""
    parts = []
    for w in found["waiting"][:limit]:
        where = "gone from its provider" if w["provider_state"] == "gone" else w["provider_state"]
        factory = f", {w['state']} at the factory's last inventory" if w.get("state") else ""
        detail = f": {w['detail']}" if w.get("detail") else ""
        parts.append(f"{w['id']} ({where}{factory}, launched {w['since_launch']} s ago{detail})")
    more = len(found["waiting"]) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class PilotsRegisteredSensor(GlideinSensor):
    """Succeeds when ``min_pilots`` pilots of one request, launch or burst have joined the pool.

    :param request: the frontend (or burst) run whose request the pilots serve, e.g. its run_id (templated);
    :param launch: or one launch id;
    :param burst: or a burst's id. Give exactly one of the three.
    :param min_pilots: how many must have registered.
    :param entries: entries to list (default: all; each listing counts against its API budget).
    :param config_file: the glidein configuration (default ``[glidein] config_file``).
    :param deferrable: wait in the triggerer (default True).
    :param poll_interval: seconds between checks (one listing per entry and one collector query each).

    Returns (XCom) the registered pilot ids. On timeout it fails naming each
    pilot that never registered, its provider state and the time since launch.
    """

    template_fields: Sequence[str] = ("request", "launch", "burst", "entries", "config_file")
    ui_color = "#e8fde8"

    def __init__(
        self,
        *,
        request: str | None = None,
        launch: str | None = None,
        burst: str | None = None,
        min_pilots: int = 1,
        entries: list[str] | None = None,
        config_file: str | None = None,
        deferrable: bool = True,
        poll_interval: float = 60.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", 1800)
        super().__init__(config_file=config_file, deferrable=deferrable, poll_interval=poll_interval, **kwargs)
        given = [k for k, v in (("request", request), ("launch", launch), ("burst", burst)) if v]
        if len(given) != 1:
            raise ValueError(f"give exactly one of request, launch or burst (got {given or 'none'})")
        if not isinstance(min_pilots, int) or min_pilots < 1:
            raise ValueError(f"min_pilots must be a positive number, not {min_pilots!r}")
        self.kind = given[0]
        self.request, self.launch, self.burst = request, launch, burst
        self.min_pilots = min_pilots
        self.entries = entries
        self._last: dict[str, Any] | None = None

    @property
    def value(self) -> str:
        return str(getattr(self, self.kind))

    def _check(self) -> dict[str, Any]:
        self._last = registration(self.config_file, self.kind, self.value, self.entries)
        return self._last

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout:
                raise AirflowSensorTimeout(self._failure(self._last or self._check())) from None
        found = self._check()
        if len(found["registered"]) >= self.min_pilots:
            return self._done(found)
        from airflow_glidein.sensors.triggers import PilotsJoinedTrigger

        self.defer_to(PilotsJoinedTrigger, kind=self.kind, value=self.value, min_pilots=self.min_pilots,
                      entries=self.entries)

    def poke(self, context: Context) -> PokeReturnValue:
        found = self._check()
        if len(found["registered"]) >= self.min_pilots:
            return PokeReturnValue(True, self._done(found))
        self.log.info("%s %s: %d of %d pilots registered, waiting for %d; not yet: %s", self.kind, self.value,
                      len(found["registered"]), found["pilots"], self.min_pilots, describe_waiting(found, 5))
        return PokeReturnValue(False)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[str]:
        if event.get("status") == "success":
            return self._done(event["found"])
        if event.get("status") == "timeout":
            raise AirflowSensorTimeout(self._failure(event["found"]))
        raise AirflowException(f"Watching the registration of {self.kind} {self.value} failed: {event.get('message')}")

    def _failure(self, found: dict[str, Any]) -> str:
        head = (f"{len(found['registered'])} of {found['pilots']} pilots of {self.kind} {self.value} joined the pool "
                f"within {int(self.timeout)} s; {self.min_pilots} wanted")
        if not found["pilots"]:
            return f"{head}: no pilot of {self.kind} {self.value} is listed at any provider (not launched yet?)"
        errors = f"; listing failed at {found['errors']}" if found.get("errors") else ""
        return f"{head}. Never registered: {describe_waiting(found)}{errors}"

    def _done(self, found: dict[str, Any]) -> list[str]:
        self.log.info("%s %s: %d of %d pilots joined the pool", self.kind, self.value, len(found["registered"]),
                      found["pilots"])
        return found["registered"]
