"""The small interface every middleware hook implements, and what they share.

A middleware hook knows three calls: create n instances for a launch, list
ours (by the factory/entry/launch tags), terminate. Retry safety lives here,
once for all middlewares: a launch first looks for instances already made
under its launch id and creates only what is missing, so a retried task (or
a provider that ignores idempotency tokens) never starts a duplicate pilot.
"""

from __future__ import annotations

import importlib
import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from airflow.sdk import BaseHook

from airflow_glidein import pilots as P
from airflow_glidein.config import Entry

log = logging.getLogger(__name__)


@dataclass
class LaunchSpec:
    launch_id: str
    frontend: str
    count: int
    image: str
    userdata: str
    request: str = ""
    extra_tags: dict[str, str] = field(default_factory=dict)


class PilotHook(BaseHook):
    """Base of the middleware hooks. Subclasses set ``middleware`` and the ``_`` methods."""

    middleware: ClassVar[str]

    def __init__(self, entry: Entry, factory: str, conn_id: str, **kwargs: Any) -> None:
        super().__init__()
        self.entry = entry
        self.factory = factory
        self.conn_id = conn_id

    # -- what each middleware implements ---------------------------------
    @abstractmethod
    def _list(self, launch_id: str | None = None) -> list[P.ProviderInstance]:
        """Our live instances at this entry (optionally of one launch)."""

    @abstractmethod
    def _create(self, spec: LaunchSpec, count: int, tags: dict[str, str]) -> list[P.ProviderInstance]:
        """Start ``count`` instances tagged with ``tags``, in as few calls as the API allows."""

    @abstractmethod
    def _terminate(self, ids: list[str]) -> None:
        """Ask the provider to terminate these instances."""

    def _force_terminate(self, ids: list[str]) -> None:
        """The middleware's stronger variant (force-delete, terminate-hard); default: terminate again."""
        self._terminate(ids)

    # -- shared behaviour -------------------------------------------------
    def tags(self, spec: LaunchSpec) -> dict[str, str]:
        return {
            P.TAG_FACTORY: self.factory,
            P.TAG_FRONTEND: spec.frontend,
            P.TAG_ENTRY: self.entry.name,
            P.TAG_LAUNCH: spec.launch_id,
            P.TAG_REQUEST: spec.request,
            **spec.extra_tags,
        }

    def list_pilots(self) -> list[P.ProviderInstance]:
        return self._list()

    def launch(self, spec: LaunchSpec) -> dict[str, list[str]]:
        """Idempotent: returns {"existing": ids, "created": ids} for the launch id."""
        existing = self._list(spec.launch_id)
        missing = spec.count - len(existing)
        created: list[P.ProviderInstance] = []
        if missing > 0:
            created = self._create(spec, missing, self.tags(spec))
        else:
            log.info("Launch %s already has %d of %d instances; creating none", spec.launch_id, len(existing), spec.count)
        return {"existing": [i.id for i in existing], "created": [i.id for i in created]}

    def terminate(self, ids: list[str], force: bool = False) -> None:
        if ids:
            (self._force_terminate if force else self._terminate)(list(ids))


def pilot_hook(entry: Entry, factory: str, conn_id: str, **kwargs: Any) -> PilotHook:
    """The hook for an entry's middleware (modules load only when used)."""
    module = importlib.import_module(f"airflow_glidein.hooks.{entry.middleware}")
    return module.HOOK(entry=entry, factory=factory, conn_id=conn_id, **kwargs)
