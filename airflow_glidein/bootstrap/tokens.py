"""Launches, bootstrap tokens and pilot bindings in the shared state store.

One batch shares one UserData, so a launch's bootstrap token is good for as
many exchanges as the launch has VMs, each bound on first use to a distinct
instance id that the caller checks is the launch's (the factory's record,
else the provider's listing). The bindings live in the state store (never in
memory), so a token is single use per instance across every replica. Only
SHA-256 hashes of tokens are stored. ``prune`` drops what has expired.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Column, Float, Integer, String, Table, Text, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from airflow_glidein.bootstrap import listings
from airflow_glidein.state import METADATA, StateStore

launches = Table(
    "glidein_launches", METADATA,
    Column("launch_id", String(255), primary_key=True),
    Column("factory", String(64), nullable=False),
    Column("entry", String(64), nullable=False),
    Column("frontend", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("provision_conn", String(255), nullable=False),  # lists the launch at its provider
    Column("pilot_credential", String(64)),  # credential id handed over by the exchange
    Column("start_expr", Text, nullable=False),
    Column("policy", Text, nullable=False),  # JSON: boot_timeout, idle_timeout, max_lifetime, retire_window
    Column("created", Float, nullable=False),
)
tokens = Table(
    "glidein_tokens", METADATA,
    Column("token_hash", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # bootstrap | upload | log
    Column("launch_id", String(255), nullable=False, index=True),
    Column("pilot_id", String(255)),  # upload tokens: the pilot they write for
    Column("expires", Float, nullable=False),
)
bindings = Table(
    "glidein_pilot_bindings", METADATA,
    Column("entry", String(64), primary_key=True),
    Column("pilot_id", String(255), primary_key=True),  # the provider's instance id
    Column("launch_id", String(255), nullable=False, index=True),
    Column("bound", Float, nullable=False),
)

T = TypeVar("T")
BOOTSTRAP, UPLOAD = "bootstrap", "upload"
LOG = "log"  # a sealed envelope's clear log-only token: a wrapper that cannot decrypt still sends its log home
UPLOAD_MARGIN = 3600  # s past max lifetime + retire window during which logs are still taken
LOG_GRACE = 3600  # s past its expiry a bootstrap token may still upload a failing wrapper's logs


class Refused(Exception):
    """A request the service will not honour; the message is safe to return to the pilot.

    ``reason`` names the refusal in metrics (glidein.bootstrap.refused.<reason>);
    ``retry_after`` (s) goes out as Retry-After on a 429 or 503.
    """

    def __init__(self, status: int, message: str, reason: str = "refused", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class Launch:
    launch_id: str
    factory: str
    entry: str
    frontend: str
    count: int
    provision_conn: str
    pilot_credential: str | None
    start_expr: str
    policy: dict[str, int]
    created: float

    @classmethod
    def from_row(cls, row: Any) -> Launch:
        d = dict(row)
        d["policy"] = json.loads(d["policy"])
        return cls(**d)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def register_launch(st: StateStore, launch: Launch, token: str, expires: float, log_token: str | None = None) -> None:
    """Record a launch (before its provider call) and one bootstrap token for it.

    A retried launch registers a new token for the instances it still has to
    make; the instances of the first try keep theirs. Both belong to the launch.
    ``log_token`` (sealed envelopes) may only upload logs of instances of the
    launch that have not exchanged yet; it never exchanges.
    """
    row = {**launch.__dict__, "policy": json.dumps(launch.policy, sort_keys=True)}
    with st.begin() as conn:
        old = conn.execute(select(launches.c.count).where(launches.c.launch_id == launch.launch_id)).first()
        if old is None:
            conn.execute(insert(launches).values(**row))
        elif launch.count > old.count:
            conn.execute(update(launches).where(launches.c.launch_id == launch.launch_id).values(count=launch.count))
        conn.execute(insert(tokens).values(token_hash=token_hash(token), kind=BOOTSTRAP,
                                           launch_id=launch.launch_id, expires=expires))
        if log_token:
            conn.execute(insert(tokens).values(token_hash=token_hash(log_token), kind=LOG,
                                               launch_id=launch.launch_id, expires=expires))


_LAUNCH_COLS = [c for c in launches.c]


def _token(conn: Any, token: str, lock: bool = False) -> tuple[Any, Launch | None]:
    """The token's row and its launch, in one query, the launch's row locked if asked (None, None: unknown)."""
    q = (select(tokens.c.token_hash, tokens.c.kind, tokens.c.pilot_id, tokens.c.expires,
                tokens.c.launch_id.label("token_launch"), *_LAUNCH_COLS)
         .select_from(tokens.join(launches, tokens.c.launch_id == launches.c.launch_id))
         .where(tokens.c.token_hash == token_hash(token)))
    row = conn.execute(q.with_for_update(of=launches) if lock else q).first()
    if row is None:
        return None, None
    return row, Launch.from_row({c.name: row._mapping[c] for c in _LAUNCH_COLS})


def _launch(conn: Any, launch_id: str, lock: bool = False) -> Launch:
    q = select(launches).where(launches.c.launch_id == launch_id)
    row = conn.execute(q.with_for_update() if lock else q).first()
    if row is None:
        raise Refused(403, f"launch {launch_id} is not known to this factory", "unknown_token")
    return Launch.from_row(row._mapping)


# Called once a token is known and valid, with (kind, token hash, launch): raises Refused to turn the request
# away (the service's per-token rate limit).
Admit = Callable[[str, str, "Launch"], None]


def _admit_none(kind: str, hashed: str, launch: Launch) -> None:
    return None


def _valid(row: Any, launch: Launch | None, now: float, kinds: tuple[str, ...], grace: float = 0,
           admit: Admit = _admit_none) -> Launch:
    if row is None or row.kind not in kinds:
        raise Refused(403, "unknown bootstrap token", "unknown_token")
    if now > row.expires + grace:
        raise Refused(403, f"{row.kind} token of launch {row.token_launch} expired {int(now - row.expires)} s ago",
                      "expired")
    assert launch is not None
    admit(row.kind, row.token_hash, launch)
    return launch


def _room(conn: Any, launch: Launch, pilot_id: str) -> tuple[str | None, int]:
    """(the launch an instance is bound to, or None; how many exchanges the launch has used), in one query."""
    row = conn.execute(select(
        select(bindings.c.launch_id).where(bindings.c.entry == launch.entry, bindings.c.pilot_id == pilot_id)
        .scalar_subquery().label("bound"),
        select(func.count()).select_from(bindings).where(bindings.c.launch_id == launch.launch_id)
        .scalar_subquery().label("used"))).one()
    return row.bound, row.used


def _check_room(conn: Any, launch: Launch, pilot_id: str) -> None:
    bound, used = _room(conn, launch, pilot_id)
    if bound is not None:
        raise Refused(403, f"instance {pilot_id} already exchanged its bootstrap token (launch {bound})", "rebind")
    if used >= launch.count:
        raise Refused(403, f"all {launch.count} exchanges of launch {launch.launch_id} are used", "used_up")


InLaunch = Callable[[Launch, str], bool]


def check_listed(found: bool, launch: Launch, pilot_id: str) -> None:
    if not found:
        raise Refused(403, f"instance {pilot_id} is not an instance of launch {launch.launch_id} at entry {launch.entry}",
                      "not_in_launch")


# Answers from the state store alone, inside the exchange's first transaction: the pilot's own id if the instance
# is known to be the launch's (the factory recorded it: its id, or an alias it claims, such as an EC2 GAHP job's
# instance id), None if a provider listing must tell; raises Refused to refuse.
Known = Callable[[Any, Launch, str], str | None]
Bound = tuple[str, float, Any]  # upload token, its expiry, what prepare() gathered


def _bind(conn: Any, launch: Launch, pilot_id: str, now: float, prepared: T) -> tuple[str, float, T]:
    """Bind the instance (the launch's row locked and its room checked); returns its upload token and expiry."""
    p = launch.policy
    expires = now + p["max_lifetime"] + p.get("retire_window", 0) + UPLOAD_MARGIN
    upload = new_token()
    conn.execute(insert(bindings).values(entry=launch.entry, pilot_id=pilot_id, launch_id=launch.launch_id, bound=now))
    conn.execute(insert(tokens).values(token_hash=token_hash(upload), kind=UPLOAD, launch_id=launch.launch_id,
                                       pilot_id=pilot_id, expires=expires))
    return upload, expires, prepared


@contextmanager
def _once(pilot_id: str) -> Iterator[None]:
    """Around a transaction that binds: a binding made meanwhile by another launch's exchange is a refusal."""
    try:
        yield
    except IntegrityError:
        raise Refused(403, f"instance {pilot_id} already exchanged its bootstrap token", "rebind") from None


def begin_exchange(st: StateStore, token: str, claimed: str, now: float,
                   prepare: Callable[[Launch], T] = lambda launch: None, admit: Admit = _admit_none,
                   known: Known = lambda conn, launch, claimed: None) -> tuple[Launch, str, Bound | None]:
    """The exchange's first transaction (the launch's row locked): checks the token and the launch's room, and
    binds at once when ``known`` can tell from the state store which of the launch's pilots ``claimed`` is.
    Returns (launch, the pilot's id, bound), bound None when the provider must tell first (then
    ``finish_exchange`` with the pilot's id the listing names)."""
    with _once(claimed), st.begin() as conn:
        launch = _valid(*_token(conn, token, lock=True), now, (BOOTSTRAP,), admit=admit)
        pilot_id = known(conn, launch, claimed)
        _check_room(conn, launch, pilot_id or claimed)
        if pilot_id is not None:
            return launch, pilot_id, _bind(conn, launch, pilot_id, now, prepare(launch))
    return launch, claimed, None


def finish_exchange(st: StateStore, launch: Launch, pilot_id: str, now: float,
                    prepare: Callable[[Launch], T] = lambda launch: None) -> Bound:
    """Bind an instance the provider listed under the launch (the room is checked again: time has passed)."""
    prepared = prepare(launch)
    with _once(pilot_id), st.begin() as conn:
        launch = _launch(conn, launch.launch_id, lock=True)
        _check_room(conn, launch, pilot_id)
        return _bind(conn, launch, pilot_id, now, prepared)


def exchange(
    st: StateStore, token: str, pilot_id: str, now: float, in_launch: InLaunch,
    prepare: Callable[[Launch], T] = lambda launch: None, admit: Admit = _admit_none,
    known: Known = lambda conn, launch, claimed: None,
) -> tuple[Launch, str, float, T]:
    """Bind ``pilot_id`` to the token's launch; returns (launch, upload token, its expiry, prepared).

    One transaction when ``known`` tells from the state store that the instance
    is the launch's; otherwise ``in_launch(launch, pilot_id)`` asks (the
    provider's listing) outside any transaction (a provider call must not hold
    a lock), and a second transaction binds. ``prepare(launch)`` gathers what
    the exchange hands over; if it fails, nothing is bound and the pilot may
    try again. (The service runs the same steps with an asynchronous listing,
    and binds an alias's pilot under the pilot's own id.)
    """
    launch, pilot_id, bound = begin_exchange(st, token, pilot_id, now, prepare, admit, known)
    if bound is None:
        check_listed(in_launch(launch, pilot_id), launch, pilot_id)
        bound = finish_exchange(st, launch, pilot_id, now, prepare)
    return (launch, *bound)


def pilot_of(st: StateStore, token: str, now: float, admit: Admit = _admit_none) -> tuple[str, str]:
    """(entry, pilot id) of a pilot's upload token: a pilot that exchanged its bootstrap token (what may fetch
    the factory's HTCondor release)."""
    with st.begin() as conn:
        row, launch = _token(conn, token)
        launch = _valid(row, launch, now, (UPLOAD,), admit=admit)
    return launch.entry, row.pilot_id


def unbound(st: StateStore, launch: Launch, pilot_id: str) -> None:
    """Refuse a bootstrap token's log upload for a pilot that has exchanged (its logs need its upload token)."""
    with st.begin() as conn:
        if _room(conn, launch, pilot_id)[0] is not None:
            raise Refused(403, f"instance {pilot_id} has exchanged its token: its logs need its upload token", "rebind")


def uploader(st: StateStore, token: str, now: float, claimed: str | None,
             admit: Admit = _admit_none) -> tuple[str, str, Launch | None]:
    """(entry, pilot id, launch) whose logs ``token`` may write; launch: set before the pilot's exchange, when
    the caller must still check the claimed instance is one of it (``check_listed``).

    An upload token names its pilot. A bootstrap (or sealed envelope's log)
    token, readable in UserData, writes only for an instance of its launch
    that has not exchanged (a wrapper that failed before the exchange), and
    not at all once every exchange of the launch is used: it never writes
    over the logs of a pilot that holds its upload token.
    """
    with st.begin() as conn:
        row, launch = _token(conn, token)
        if row is not None and row.kind == UPLOAD:
            if now > row.expires:
                raise Refused(403, f"upload token of pilot {row.pilot_id} expired", "expired")
            return _valid(row, launch, now, (UPLOAD,), admit=admit).entry, row.pilot_id, None
        launch = _valid(row, launch, now, (BOOTSTRAP, LOG), grace=LOG_GRACE, admit=admit)
        if not claimed:
            raise Refused(400, "a log upload with a bootstrap token must name its instance_id", "bad_request")
        bound, used = _room(conn, launch, claimed)
        if bound is not None:
            raise Refused(403, f"instance {claimed} has exchanged its token: its logs need its upload token", "rebind")
        if used >= launch.count:
            raise Refused(403, f"all {launch.count} exchanges of launch {launch.launch_id} are used: logs need "
                               "the pilot's upload token", "used_up")
    return launch.entry, claimed, launch


KEEP_MIN = 3600  # s a launch is kept at least (it is registered before its first token is used)


def prune(st: StateStore, now: float) -> dict[str, int]:
    """Drop what no request can use any more: expired tokens, then launches without a token left, their
    bindings and listings. Returns what was dropped, by table."""
    with st.begin() as conn:
        dropped = conn.execute(delete(tokens).where(or_(
            and_(tokens.c.kind == UPLOAD, tokens.c.expires < now),
            and_(tokens.c.kind != UPLOAD, tokens.c.expires + LOG_GRACE < now)))).rowcount
        done = [r.launch_id for r in conn.execute(select(launches.c.launch_id).where(
            launches.c.created < now - KEEP_MIN, launches.c.launch_id.not_in(select(tokens.c.launch_id))))]
        unbound = 0
        for i in range(0, len(done), 500):
            chunk = done[i:i + 500]
            unbound += conn.execute(delete(bindings).where(bindings.c.launch_id.in_(chunk))).rowcount
            conn.execute(delete(launches).where(launches.c.launch_id.in_(chunk)))
    listings.forget(st, done)
    return {"tokens": dropped, "launches": len(done), "bindings": unbound}
