"""Metrics through Airflow's Stats (StatsD, Datadog or OpenTelemetry, as [metrics] configures).

Names (prefixed by Airflow's [metrics] statsd_prefix, default ``airflow``).
Each is emitted with its dimensions in the name, for plain StatsD, and as
tags, for backends that keep tags:

    glidein.demand.idle_jobs.<frontend>.<entry>    gauge  idle jobs matching, this frontend's share at the entry
    glidein.demand.unmatched.<frontend>            gauge  idle jobs that match no entry
    glidein.request.level.<frontend>.<entry>       gauge  idle pilots the frontend requests
    glidein.pilots.<entry>.<state>                 gauge  pilots per entry and state, after a factory cycle
    glidein.launches.<entry>                       count  pilots launched
    glidein.terminations.<entry>.<action>          count  terminate / force_terminate / retire asked
    glidein.failures.<entry>.<kind>                count  kind: launch, boot, listing, terminate
    glidein.stuck.<entry>                          gauge  pilots terminate could not remove
    glidein.api.calls.<endpoint>                   count  provider API calls (each takes a budget token)
    glidein.api.throttled.<endpoint>               count  calls the provider throttled (then retried with backoff)
    glidein.bootstrap.exchanges.<entry>            count  bootstrap tokens exchanged (the bootstrap service)
    glidein.bootstrap.refused.<reason>             count  requests refused, by reason (rebind: a bound id claimed
                                                          again; identity, not_in_launch, used_up, expired,
                                                          unknown_token, rate_limited_*, unavailable, quota, ...)
    glidein.bootstrap.uploads.<entry>              count  pilot logs stored
    glidein.bootstrap.upload_bytes.<entry>         count  bytes of pilot logs stored
    glidein.bootstrap.listings.<entry>             count  provider listings the bootstrap service made
    glidein.bootstrap.releases.<entry>             count  HTCondor releases served to pilots (grid worker nodes)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _part(value: Any) -> str:
    return _UNSAFE.sub("_", str(value))


def _name(*parts: Any) -> str:
    return "glidein." + ".".join(_part(p) for p in parts)


def _stats():
    from airflow.sdk.observability.stats import Stats

    return Stats


def gauge(value: float, *parts: Any, **tags: Any) -> None:
    try:
        _stats().gauge(_name(*parts), value, tags={k: str(v) for k, v in tags.items()})
    except Exception:  # metrics must never fail a task
        pass


def incr(count: int, *parts: Any, **tags: Any) -> None:
    if count <= 0:
        return
    try:
        _stats().incr(_name(*parts), count, tags={k: str(v) for k, v in tags.items()})
    except Exception:
        pass


def pilots(counts: Mapping[str, Mapping[str, Mapping[str, int]]], states: tuple[str, ...]) -> None:
    """One gauge per entry and state (zeros included, so a state that empties is seen to)."""
    for entry, by_key in counts.items():
        for state in states:
            n = sum(c.get(state, 0) for c in by_key.values())
            gauge(n, "pilots", entry, state, entry=entry, state=state)
        gauge(sum(c.get("stuck", 0) for c in by_key.values()), "stuck", entry, entry=entry)
