"""Triggers behind the glidein sensors (they run in the triggerer).

Provider clients (boto3, openstacksdk, pyone, htcondor2) are synchronous, so
each poll runs in a worker thread; the event loop only sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent


class PilotsGoneTrigger(BaseTrigger):
    """Fires when the providers no longer list any of the target pilots, or at the deadline."""

    def __init__(self, targets: list[dict[str, Any]], config_file: str | None, poll_interval: float,
                 deadline: float) -> None:
        super().__init__()
        self.targets = targets
        self.config_file = config_file
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_glidein.sensors.triggers.PilotsGoneTrigger",
            {"targets": self.targets, "config_file": self.config_file, "poll_interval": self.poll_interval,
             "deadline": self.deadline},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_glidein.sensors.pilots import still_present

        while True:
            try:
                present = await asyncio.to_thread(still_present, self.config_file, self.targets)
            except Exception as exc:  # an error event, not an exception: the sensor reports it
                yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                return
            if not present:
                yield TriggerEvent({"status": "success", "present": []})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "present": present})
                return
            self.log.info("%d pilots still present; next check in %s s", len(present), self.poll_interval)
            await asyncio.sleep(self.poll_interval)


class IdleJobsTrigger(BaseEventTrigger):
    """Fires when a frontend's matching idle jobs reach ``threshold``.

    Behind ``IdleJobsSensor`` (``deadline`` set) it fires once: success,
    timeout at the deadline, or an error event. As a frontend's asset watcher
    (no deadline) it runs for as long as the DAG is deployed: a failed query is
    logged and tried again at the next poll, and it fires only if the frontend
    was not fired within ``min_interval`` seconds (``airflow_glidein.watch``),
    because the triggerer re-creates it after every event while the jobs are
    still idle. Its kwargs are fixed by the configuration: the watcher's
    identity is a hash of them.
    """

    def __init__(self, frontend: str, config_file: str | None = None, threshold: int = 1,
                 entries: list[str] | None = None, poll_interval: float = 30.0, deadline: float | None = None,
                 min_interval: float = 0.0) -> None:
        super().__init__()
        self.frontend = frontend
        self.config_file = config_file
        self.threshold = threshold
        self.entries = entries
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.min_interval = min_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_glidein.sensors.triggers.IdleJobsTrigger",
            {"frontend": self.frontend, "config_file": self.config_file, "threshold": self.threshold,
             "entries": self.entries, "poll_interval": self.poll_interval, "deadline": self.deadline,
             "min_interval": self.min_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_glidein.sensors.idle_jobs import matching_idle

        watcher = self.deadline is None
        while True:
            try:
                found = await asyncio.to_thread(matching_idle, self.config_file, self.frontend, self.entries)
                enough = found["idle"] >= self.threshold
                # a watcher fires only with the frontend claimed: not started within min_interval
                fire = enough and (not watcher or await asyncio.to_thread(self._claim, found["idle"]))
            except Exception as exc:
                if not watcher:  # an error event, not an exception: the sensor reports it
                    yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                    return
                self.log.warning("Watching the demand of frontend %s failed (%s: %s); next try in %s s",
                                 self.frontend, type(exc).__name__, exc, self.poll_interval)
                await asyncio.sleep(self.poll_interval)
                continue
            if fire:
                self.log.info("Frontend %s: %d matching idle jobs (threshold %d)", self.frontend, found["idle"],
                              self.threshold)
                yield TriggerEvent({"status": "success", "demand": found, "at": time.time()})
                return
            if enough:
                self.log.info("Frontend %s: %d matching idle jobs, but a run started less than %s s ago",
                              self.frontend, found["idle"], self.min_interval)
            else:
                self.log.info("Frontend %s: %d matching idle jobs, waiting for %d", self.frontend, found["idle"],
                              self.threshold)
            if not watcher and time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "demand": found})
                return
            await asyncio.sleep(self.poll_interval)

    def _claim(self, idle: int) -> bool:
        from airflow_glidein import state, watch

        return watch.claim(state.store(), self.frontend, idle, time.time(), self.min_interval)


class PilotsJoinedTrigger(BaseTrigger):
    """Fires when ``min_pilots`` pilots tagged ``kind`` = ``value`` have joined the pool, or at the deadline."""

    def __init__(self, kind: str, value: str, min_pilots: int, entries: list[str] | None, config_file: str | None,
                 poll_interval: float, deadline: float) -> None:
        super().__init__()
        self.kind = kind
        self.value = value
        self.min_pilots = min_pilots
        self.entries = entries
        self.config_file = config_file
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_glidein.sensors.triggers.PilotsJoinedTrigger",
            {"kind": self.kind, "value": self.value, "min_pilots": self.min_pilots, "entries": self.entries,
             "config_file": self.config_file, "poll_interval": self.poll_interval, "deadline": self.deadline},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_glidein.sensors.registered import registration

        while True:
            try:
                found = await asyncio.to_thread(registration, self.config_file, self.kind, self.value, self.entries)
            except Exception as exc:  # an error event, not an exception: the sensor reports it
                yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                return
            if len(found["registered"]) >= self.min_pilots:
                yield TriggerEvent({"status": "success", "found": found})
                return
            if time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "found": found})
                return
            self.log.info("%s %s: %d of %d pilots registered, waiting for %d; next check in %s s", self.kind,
                          self.value, len(found["registered"]), found["pilots"], self.min_pilots, self.poll_interval)
            await asyncio.sleep(self.poll_interval)
