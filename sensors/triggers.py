"""Triggers behind the glidein sensors (they run in the triggerer).

Provider clients (boto3, openstacksdk, pyone, htcondor2) are synchronous, so
each poll runs in a worker thread; the event loop only sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent


async def poll_until(trigger: Any, key: str, check: Callable[[], Any], done: Callable[[Any], bool],
                     waiting: Callable[[Any], str]) -> AsyncIterator[TriggerEvent]:
    """A one-shot trigger's loop: ``check`` in a worker thread every ``trigger.poll_interval`` until ``done``
    (a success event), ``trigger.deadline`` (a timeout event) or an error (an error event, not an exception:
    the sensor reports it). Each event carries the last check under ``key``."""
    while True:
        try:
            found = await asyncio.to_thread(check)
        except Exception as exc:
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
            return
        if done(found):
            yield TriggerEvent({"status": "success", key: found})
            return
        if time.time() >= trigger.deadline:
            yield TriggerEvent({"status": "timeout", key: found})
            return
        trigger.log.info("%s; next check in %s s", waiting(found), trigger.poll_interval)
        await asyncio.sleep(trigger.poll_interval)


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

        async for event in poll_until(self, "present", lambda: still_present(self.config_file, self.targets),
                                      lambda present: not present, lambda p: f"{len(p)} pilots still present"):
            yield event


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

        async for event in poll_until(
            self, "found", lambda: registration(self.config_file, self.kind, self.value, self.entries),
            lambda found: len(found["registered"]) >= self.min_pilots,
            lambda f: f"{self.kind} {self.value}: {len(f['registered'])} of {f['pilots']} pilots registered, "
                      f"waiting for {self.min_pilots}",
        ):
            yield event
