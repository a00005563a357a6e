"""What the bootstrap service does before it trusts a request: who sent it, how often, what it may log.

Anyone who can read a VM's UserData can talk to the service, so every value
a request carries is escaped before it reaches a log line (``clean``), and
requests are rate-limited (``Limiter``) per client address (all requests,
and refused ones) and per token (refused ones: a launch's boot storm never
slows itself). The address is the TCP peer's, or, only when that peer is one of the
configured ``[glidein] bootstrap_trusted_proxies``, the last address in
X-Forwarded-For that is not a trusted proxy (a client can prepend anything to
that header; only what our own proxies appended is believed).

Limits live in each service process (a token bucket per key, least recently
used keys forgotten first): N replicas let N times the rate through, which
still bounds what one client costs each replica.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)


def clean(value: Any, limit: int = 120) -> str:
    """``value`` safe for one log line: control characters (newlines, NUL, ANSI escapes), backslashes and
    non-ASCII shown escaped (``\\n``, ``\\x1b``), cut at ``limit`` characters."""
    text = str(value)
    out = text[:limit].encode("unicode_escape").decode("ascii")
    return out + ("..." if len(text) > limit else "")


def setting(key: str, default: str) -> str:
    """A ``[glidein]`` option of the bootstrap service."""
    from airflow.sdk import conf

    return conf.get("glidein", key, fallback=None) or default


def number(key: str, default: float) -> float:
    """A numeric ``[glidein]`` option; a value that is not a positive number is logged and the default used."""
    try:
        value = float(setting(key, str(default)))
        if value > 0:
            return value
    except ValueError:
        pass
    log.error("[glidein] %s is not a positive number; using %g", key, default)
    return default


def networks(key: str) -> tuple[Any, ...]:
    """A ``[glidein]`` option listing addresses or networks; an item that is neither is logged and left out."""
    out = []
    for item in (p.strip() for p in setting(key, "").split(",")):
        try:
            if item:
                out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            log.error("[glidein] %s: item %s is no address or network; left out", key, clean(item, 60))
    return tuple(out)


def env_stamp() -> tuple[tuple[str, str], ...]:
    """What the service's settings can change with while it runs: Airflow reads its config file once, but
    AIRFLOW__GLIDEIN__* variables (and AIRFLOW_HOME) are looked up on each read. A key for caching them."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AIRFLOW__GLIDEIN__")
                        or k == "AIRFLOW_HOME"))


@dataclass(frozen=True)
class Settings:
    """The service's request limits ([glidein] options)."""

    address_rate: float  # requests per second per client address (all kinds)
    address_burst: float
    refusal_rate: float  # refused requests per second per address before the address is turned away
    refusal_burst: float
    trusted_proxies: tuple[Any, ...]  # ip networks
    listing_interval: float  # s between two provider listings of one launch

    @classmethod
    def read(cls) -> Settings:
        return _settings(env_stamp())

    @classmethod
    def _read(cls) -> Settings:
        rate = number("bootstrap_address_rate", 200)
        refusals = number("bootstrap_address_refusals", 120)  # per minute
        return cls(rate, rate * 10, refusals / 60.0, refusals, networks("bootstrap_trusted_proxies"),
                   number("bootstrap_listing_interval", 20))


@lru_cache(maxsize=4)
def _settings(stamp: tuple[tuple[str, str], ...]) -> Settings:
    return Settings._read()


def _trusted(addr: str, proxies: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(scope: dict[str, Any], proxies: tuple[Any, ...]) -> str:
    """The client's address: the peer, or behind our trusted proxies the first untrusted hop they saw."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = []
    for name, value in scope.get("headers") or []:
        if name == b"x-forwarded-for":
            hops += [h.strip() for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return "invalid-forwarded-for"
    return peer


class Buckets:
    """Token buckets by key; the least recently used keys are dropped past ``max_keys``."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _level(self, key: str, rate: float, burst: float, now: float) -> float:
        level, at = self._levels.pop(key, (burst, now))
        return min(burst, level + (now - at) * rate)

    def take(self, key: str, rate: float, burst: float, now: float | None = None) -> float:
        """Take one token: 0.0, or the seconds until one is there (nothing taken)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            level = self._level(key, rate, burst, now)
            wait = 0.0 if level >= 1 else (1 - level) / rate
            self._levels[key] = (level - 1 if wait == 0 else level, now)
            if len(self._levels) > self.max_keys:
                self._levels.popitem(last=False)
        return wait

    def empty_for(self, key: str, rate: float, burst: float, now: float | None = None) -> float:
        """Seconds until ``key`` has a token again (0.0: it has one); takes nothing."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if key not in self._levels:
                return 0.0
            level = self._level(key, rate, burst, now)
            self._levels[key] = (level, now)
        return 0.0 if level >= 1 else (1 - level) / rate


class Limiter:
    """The service's limits: requests per address, refusals per address, refusals per token."""

    def __init__(self) -> None:
        self.requests = Buckets()
        self.refusals = Buckets()
        self.tokens = Buckets()

    def admit(self, address: str, s: Settings) -> float:
        """0.0 if a request from ``address`` may go on, else the seconds it should wait."""
        return max(self.refusals.empty_for(address, s.refusal_rate, s.refusal_burst),
                   self.requests.take(address, s.address_rate, s.address_burst))

    def refused(self, address: str, s: Settings) -> None:
        self.refusals.take(address, s.refusal_rate, s.refusal_burst)

    def token_blocked(self, token_hash: str, per_minute: float) -> float:
        """0.0 if the token may go on, else the seconds until it may (it was refused too often lately)."""
        return self.tokens.empty_for(token_hash, per_minute / 60.0, per_minute)

    def token_refused(self, token_hash: str, per_minute: float) -> None:
        self.tokens.take(token_hash, per_minute / 60.0, per_minute)
