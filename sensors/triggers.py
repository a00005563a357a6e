"""Triggers behind the glidein sensors (they run in the triggerer).

Provider clients (boto3, openstacksdk, pyone, htcondor2) are synchronous, so
each poll runs in a worker thread; the event loop only sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


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
