"""Sensors on pilots: wait until terminated pilots are gone at their providers.

Deferrable by default: the wait runs in the triggerer (``PilotsGoneTrigger``)
and frees the worker slot; poke and reschedule modes use the same check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException

from airflow_glidein import pilots as P
from airflow_glidein.config import get_config
from airflow_glidein.hooks import pilot_hook
from airflow_glidein.operators.lifecycle import entry_of
from airflow_glidein.sensors.base import GlideinSensor

if TYPE_CHECKING:
    from airflow.sdk import Context


def still_present(config_file: str | None, targets: list[dict[str, Any]]) -> list[str]:
    """Pilot keys among ``targets`` ({"entry", "conn", "ids"}) that their provider still lists."""
    cfg = get_config(config_file)
    present: list[str] = []
    for t in targets:
        if not t.get("ids"):
            continue
        hook = pilot_hook(entry_of(cfg, t["entry"]), cfg.factory.name, t["conn"])
        present += [P.pilot_key(t["entry"], i) for i in hook.still_there(list(t["ids"]))]
    return sorted(present)


class PilotsTerminatedSensor(GlideinSensor):
    """Succeeds when every pilot in ``targets`` has left its provider's listing.

    :param targets: [{"entry": name, "conn": connection id, "ids": [...]}], e.g.
        the return value of the factory's reap_pilots task (templated).
    :param config_file: the glidein configuration (default ``[glidein] config_file``).
    :param deferrable: wait in the triggerer (default True).
    :param poll_interval: seconds between provider listings (they count against the API budget).

    On timeout it fails naming the pilots still present; the factory's next
    cycles terminate them again, then force, then report them stuck.
    """

    template_fields: Sequence[str] = ("targets", "config_file")
    ui_color = "#fde8e8"

    def __init__(
        self,
        *,
        targets: Any,
        config_file: str | None = None,
        deferrable: bool = True,
        poll_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", 300)
        super().__init__(config_file=config_file, deferrable=deferrable, poll_interval=poll_interval, **kwargs)
        self.targets = targets

    def _targets(self) -> list[dict[str, Any]]:
        return [t for t in (self.targets or []) if t.get("ids")]

    def execute(self, context: Context) -> Any:
        if not self._targets():
            self.log.info("No terminated pilots to verify")
            return []
        if not self.deferrable:
            return super().execute(context)
        if not still_present(self.config_file, self._targets()):
            return self._done()
        from airflow_glidein.sensors.triggers import PilotsGoneTrigger

        self.defer_to(PilotsGoneTrigger, targets=self._targets())

    def poke(self, context: Context) -> bool:
        present = still_present(self.config_file, self._targets())
        if present:
            self.log.info("%d pilots still present: %s", len(present), present[:20])
        return not present

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[str]:
        if event.get("status") == "success":
            return self._done()
        if event.get("status") == "timeout":
            raise AirflowException(
                f"{len(event['present'])} pilots still present after terminate: {event['present'][:50]}"
            )
        raise AirflowException(f"Verifying terminations failed: {event.get('message')}")

    def _done(self) -> list[str]:
        ids = sorted(i for t in self._targets() for i in t["ids"])
        self.log.info("All %d terminated pilots are gone at their providers", len(ids))
        return ids
