"""What the glidein sensors share: deferrable by default, one poll interval for every mode, one way to defer."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator


class GlideinSensor(BaseSensorOperator):
    """Base of the glidein sensors.

    ``poll_interval`` is the seconds between checks in every mode: the
    trigger's sleep when deferred, ``poke_interval`` in poke and reschedule
    modes (unless that is given). Each subclass defines ``poke`` (the check)
    and ``execute_complete`` (the trigger's event).
    """

    def __init__(self, *, config_file: str | None = None, deferrable: bool = True, poll_interval: float = 60.0,
                 **kwargs: Any) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.config_file = config_file
        self.deferrable = deferrable
        self.poll_interval = poll_interval

    def defer_to(self, trigger_cls: type, **kwargs: Any) -> None:
        """Wait in the triggerer: the trigger fires at this sensor's timeout itself (a timeout event, with
        what it last saw); the task-level timeout a minute later is only the backstop."""
        self.defer(
            trigger=trigger_cls(config_file=self.config_file, poll_interval=self.poll_interval,
                                deadline=time.time() + float(self.timeout), **kwargs),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout) + 60),
        )
