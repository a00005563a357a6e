"""API rate budget per endpoint, shared by every worker through the state store.

Clouds cap calls per window (Nova at CERN: about 500 requests per 5 minutes);
going over gets 429s, then a blocked account. Every provider call takes a
token first. The bucket holds ``requests`` tokens and a token comes back
exactly ``per_seconds`` after it was spent. A classic bucket (refill at
requests/per_seconds, capacity requests) lets up to twice the budget through
in some window; returning each token one window after its use never lets
more than ``requests`` calls into any window of ``per_seconds``, which is
what the provider counts. A small guard (1% of the window, at most 1 s) is
added, because the provider stamps a call when it arrives and network latency
varies. The spent tokens are rows in the state store, so every worker
process and every replica shares them; taking one is atomic across them (a
PostgreSQL advisory lock per endpoint, SQLite's write lock), and a token is
stamped with the time read under that lock.

Time goes through ``CLOCK`` (time and sleep), one seam for the budget, the
hooks' backoff and their termination checks.
"""

from __future__ import annotations

import hashlib
import logging
import time

from sqlalchemy import Column, Float, Index, Integer, String, Table, delete, func, insert, select, text

from airflow_glidein import metrics, state

log = logging.getLogger(__name__)

SPENT = Table(
    "glidein_api_tokens",
    state.METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("endpoint", String(255), nullable=False),
    Column("at", Float, nullable=False),  # when the token was spent (epoch s)
    Index("ix_glidein_api_tokens_endpoint_at", "endpoint", "at"),
)


class SystemClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


CLOCK = SystemClock()


class BudgetExhausted(RuntimeError):
    """No token within the longest wait allowed; the call was not made."""


class ApiBudget:
    """The call budget of one API endpoint."""

    def __init__(self, endpoint: str, requests: int = 500, per_seconds: float = 300,
                 max_wait: float | None = None, url: str | None = None) -> None:
        if requests < 1 or per_seconds <= 0:
            raise ValueError(f"API budget of {endpoint}: requests must be >= 1 and per_seconds > 0")
        self.endpoint = endpoint
        self.requests = int(requests)
        self.per_seconds = float(per_seconds)
        self.hold = self.per_seconds + min(1.0, self.per_seconds * 0.01)  # how long a spent token stays out
        self.max_wait = self.hold if max_wait is None else float(max_wait)
        self.url = url

    @classmethod
    def for_entry(cls, entry) -> ApiBudget:
        b = entry.api_budget
        return cls(entry.api_endpoint, b.requests, b.per_seconds)

    def acquire(self, n: int = 1) -> float:
        """Take ``n`` tokens, waiting for them if needed; returns the seconds waited."""
        if n > self.requests:
            raise ValueError(f"{n} tokens asked of {self.endpoint}, whose budget is {self.requests}")
        waited = 0.0
        store = state.store(self.url)
        while True:
            with store.begin() as conn:
                self._lock(conn)
                now = CLOCK.time()  # read under the lock: a token is stamped when it is really taken
                conn.execute(delete(SPENT).where(SPENT.c.endpoint == self.endpoint,
                                                 SPENT.c.at <= now - self.hold))
                used = conn.execute(select(func.count()).where(SPENT.c.endpoint == self.endpoint)).scalar_one()
                if used + n <= self.requests:
                    conn.execute(insert(SPENT), [{"endpoint": self.endpoint, "at": now}] * n)
                    metrics.incr(n, "api", "calls", self.endpoint, endpoint=self.endpoint)  # every call takes a token
                    return waited
                # the (used + n - requests)-th oldest token must come back first
                back = conn.execute(
                    select(SPENT.c.at).where(SPENT.c.endpoint == self.endpoint)
                    .order_by(SPENT.c.at).offset(used + n - self.requests - 1).limit(1)
                ).scalar_one()
            wait = max(back + self.hold - now, 0.001)
            if waited + wait > self.max_wait:
                raise BudgetExhausted(
                    f"API budget of {self.endpoint} ({self.requests} calls per {self.per_seconds:g} s) "
                    f"has no token for another {wait:.0f} s; not calling"
                )
            if waited == 0:
                log.info("API budget of %s spent (%d calls in %g s): waiting %.1f s",
                         self.endpoint, used, self.per_seconds, wait)
            CLOCK.sleep(wait)
            waited += wait

    def _lock(self, conn) -> None:
        """Serialize takers of this endpoint's tokens until commit. Under PostgreSQL's READ COMMITTED,
        delete-count-insert lets two workers both see a free token and both take it; SQLite's BEGIN
        IMMEDIATE already holds the database's write lock."""
        if conn.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.blake2b(f"glidein-api-budget:{self.endpoint}".encode(), digest_size=8)
                                 .digest(), "big", signed=True)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def used(self) -> int:
        """Tokens spent in the current window."""
        now = CLOCK.time()
        with state.store(self.url).begin() as conn:
            return conn.execute(select(func.count()).where(
                SPENT.c.endpoint == self.endpoint, SPENT.c.at > now - self.hold)).scalar_one()
