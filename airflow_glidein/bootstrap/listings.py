"""Is an instance one of a launch's? The factory's record first, then one provider listing per launch and interval.

A token holder names any instance id it likes, so what it asks must not
decide how often the provider is called: a launch is listed at most once per
``INTERVAL`` whatever is asked, misses included; one service process lists
while the others wait for its answer (the claim is a row of
``glidein_launch_listings``, shared by every replica through the state
store); a listing never waits for the API budget (``budget.no_wait``): a
spent budget is a 503 with Retry-After, remembered like a failed listing.
An id once listed under the launch stays known (ids are never reused), so
hits never list again; only misses wait for the next interval.

A listing maps each id a pilot may claim to the pilot's own id: itself, or,
for an alias (an EC2 GAHP job's instance id), the job it belongs to
(shared as ``alias=id``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio import to_thread
from sqlalchemy import Column, Float, String, Table, Text, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from airflow_glidein.bootstrap.guard import clean
from airflow_glidein.state import METADATA, StateStore

log = logging.getLogger(__name__)

INTERVAL = 20.0  # s between two listings of one launch (default of [glidein] bootstrap_listing_interval)
CLAIM_TTL = 90.0  # s after which a listing claim of a process that died is taken over
WAIT = 10.0  # s a request waits for another request's listing of the same launch
POLL = 0.1  # s between looks at that process's answer
FAILED_HOLD_MAX = 60.0  # s at most a failed listing (or a spent budget) keeps the next one off

listings = Table(
    "glidein_launch_listings", METADATA,
    Column("launch_id", String(255), primary_key=True),
    # space-separated ids the provider listed under the launch ("alias=id" for an alias); NULL: the listing failed
    Column("ids", Text),
    Column("listed", Float, nullable=False),  # when it was asked (0: never)
    Column("next", Float, nullable=False),  # no new listing before then
    Column("claimed", Float),  # a process is listing it since then (NULL: none)
    Column("reason", Text),  # why the last listing failed
)


class Unavailable(Exception):
    """No answer now; try again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


@dataclass
class _Known:
    ids: dict[str, str] = field(default_factory=dict)  # an id a pilot may claim -> the pilot's own id
    next: float = 0.0  # no new listing before then
    failed: str | None = None  # the last listing's failure, while ``next`` holds
    used: float = 0.0


# What a listing call returns: {an id a pilot of the launch may claim: the pilot's own id}; raises
# ListingFailed(message, retry_after).
Lister = Callable[[], Mapping[str, str]]


def _decode(text: str | None) -> dict[str, str]:
    return {name: pid or name for name, _, pid in (item.partition("=") for item in (text or "").split())}


def _encode(ids: Mapping[str, str]) -> str:
    return " ".join(sorted(name if pid == name else f"{name}={pid}" for name, pid in ids.items()))


class ListingFailed(Exception):
    def __init__(self, message: str, retry_after: float = INTERVAL) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LaunchListings:
    """One process's view of the launches' listings (the state store holds the shared one).

    Requests wait for a listing asynchronously (an anyio lock per launch,
    sleeps between looks at another process's claim): a waiting request holds
    no worker thread. Only the listing itself and the database work run in
    threads.
    """

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._lock = threading.Lock()

    def _entry(self, launch_id: str) -> tuple[_Known, anyio.Lock]:
        with self._lock:
            now = time.time()
            if len(self._known) > 10_000:  # forget launches not asked about for an hour
                for k in [k for k, v in self._known.items() if now - v.used > 3600]:
                    self._known.pop(k, None)
                    self._locks.pop(k, None)
            known = self._known.setdefault(launch_id, _Known())
            known.used = now
            if launch_id not in self._locks:
                self._locks[launch_id] = anyio.Lock()
            return known, self._locks[launch_id]

    def known(self, launch_id: str, instance_id: str) -> str | None:
        """The pilot's id if this process has seen ``instance_id`` listed under the launch (no database, no
        provider), else None."""
        k = self._known.get(launch_id)
        return k.ids.get(instance_id) if k is not None else None

    async def find(self, st: StateStore, launch_id: str, instance_id: str, lister: Lister,
                   interval: float = INTERVAL) -> str | None:
        """The pilot's id if ``instance_id`` is listed under ``launch_id`` (None: it is not). Lists through
        ``lister`` at most once per interval."""
        known, lock = self._entry(launch_id)
        if instance_id in known.ids:
            return known.ids[instance_id]
        busy = Unavailable(f"launch {launch_id} is being listed at its provider; try again", 1)
        with anyio.move_on_after(WAIT) as waited:
            await lock.acquire()
        if waited.cancelled_caught:
            raise busy
        try:
            if instance_id in known.ids:
                return known.ids[instance_id]
            now = time.time()
            if now < known.next:
                return self._answer(known, instance_id, now)
            deadline = now + WAIT
            while True:
                got = await to_thread.run_sync(_shared, st, launch_id, now)
                if got is not None:  # another process listed it lately (or is the one to do it now: we are)
                    ids, nxt, failed = got
                    known.ids.update(ids)
                    known.next, known.failed = nxt, failed
                    if nxt <= now:
                        await to_thread.run_sync(self._list, st, launch_id, known, lister, now, interval)
                    return self._answer(known, instance_id, time.time())
                if time.time() > deadline:
                    raise busy
                await anyio.sleep(POLL)
                now = time.time()
        finally:
            lock.release()

    def _answer(self, known: _Known, instance_id: str, now: float) -> str | None:
        if instance_id in known.ids:
            return known.ids[instance_id]
        if known.failed is not None:
            raise Unavailable(known.failed, known.next - now)
        return None

    def _list(self, st: StateStore, launch_id: str, known: _Known, lister: Lister, now: float,
              interval: float) -> None:
        """We hold the claim: ask the provider, share what it said (or that it failed)."""
        try:
            ids, failed, hold = dict(lister()), None, interval
        except ListingFailed as exc:
            ids, failed, hold = None, str(exc), min(max(exc.retry_after, 1.0), FAILED_HOLD_MAX)
        except Exception as exc:  # a failure is shared like an answer: the next request must not call again
            log.warning("Listing launch %s failed: %s", clean(launch_id), clean(exc, 300))
            ids, failed, hold = None, describe(launch_id, exc), interval
        nxt = time.time() + hold
        with st.begin() as conn:
            conn.execute(update(listings).where(listings.c.launch_id == launch_id).values(
                ids=None if ids is None else _encode({**known.ids, **ids}), listed=now, next=nxt,
                claimed=None, reason=failed))
        if ids is not None:
            known.ids.update(ids)
        known.next, known.failed = nxt, failed


def _shared(st: StateStore, launch_id: str, now: float) -> tuple[dict[str, str], float, str | None] | None:
    """The shared row: (ids, next, failure) to use, with next <= now meaning "the claim is ours: list";
    None while another process holds the claim."""
    with st.begin() as conn:
        row = conn.execute(select(listings).where(listings.c.launch_id == launch_id).with_for_update()).first()
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(insert(listings).values(launch_id=launch_id, ids="", listed=0.0, next=0.0,
                                                         claimed=now))
            except IntegrityError:  # another process claimed it first
                return None
            return {}, 0.0, None
        ids = _decode(row.ids)
        if row.next > now:
            return ids, row.next, (row.reason or "the last listing failed") if row.ids is None else None
        if row.claimed is not None and now - row.claimed < CLAIM_TTL:
            return None
        conn.execute(update(listings).where(listings.c.launch_id == launch_id).values(claimed=now))
        return ids, 0.0, None


def forget(st: StateStore, launch_ids: list[str]) -> None:
    with st.begin() as conn:
        for i in range(0, len(launch_ids), 500):
            conn.execute(delete(listings).where(listings.c.launch_id.in_(launch_ids[i:i + 500])))


def describe(launch_id: str, exc: Exception) -> str:
    return f"cannot list launch {launch_id} at its provider now ({clean(type(exc).__name__)}); try again"
