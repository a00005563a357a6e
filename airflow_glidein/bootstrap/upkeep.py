"""What the bootstrap service keeps, pruned once per factory cycle (FactoryReportOperator calls ``prune``).

Expired tokens; launches with no token left, their bindings and shared
listings; pilot logs stored longer ago than ``[glidein]
pilot_log_retention_days`` (default 30); what uploads that died left behind.
"""

from __future__ import annotations

import logging
import time

from airflow_glidein.bootstrap import tokens
from airflow_glidein.bootstrap.guard import clean
from airflow_glidein.bootstrap.logs import LogStore
from airflow_glidein.state import StateStore, store

log = logging.getLogger(__name__)


def prune(st: StateStore | None = None, now: float | None = None) -> dict[str, int]:
    """Prune; returns what went, by kind. A failure is logged, never raised: it must not fail the cycle."""
    st = st or store()
    now = time.time() if now is None else now  # the service checks tokens against real time
    try:
        gone = tokens.prune(st, now)
        gone.update(LogStore.from_config().prune(st, now))
    except Exception as exc:
        log.warning("Bootstrap upkeep failed (tried again next cycle): %s", clean(exc, 300))
        return {}
    if any(gone.values()):
        log.info("Bootstrap upkeep pruned %s", ", ".join(f"{n} {k}" for k, n in gone.items() if n))
    return gone
