"""Launches, bootstrap tokens and pilot bindings in the shared state store.

docs/architecture.md, "Tokens": one batch shares one UserData, so a
launch's bootstrap token is good for as many exchanges as the launch has
VMs, each bound on first use to a distinct instance id that the caller
checks against the provider's listing for that launch. The bindings live in
the state store (never in memory), so a token is single use per instance
across every API-server replica. Only SHA-256 hashes of tokens are stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Column, Float, Integer, String, Table, Text, func, insert, select, update
from sqlalchemy.exc import IntegrityError

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
    """A token the service will not honour; the message is safe to return to the pilot."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
        d = dict(row._mapping)
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


def _token(conn: Any, token: str) -> Any:
    return conn.execute(select(tokens).where(tokens.c.token_hash == token_hash(token))).first()


def _launch(conn: Any, launch_id: str, lock: bool = False) -> Launch:
    q = select(launches).where(launches.c.launch_id == launch_id)
    row = conn.execute(q.with_for_update() if lock else q).first()
    if row is None:
        raise Refused(403, f"launch {launch_id} is not known to this factory")
    return Launch.from_row(row)


def _bootstrap_launch(conn: Any, token: str, now: float, grace: float = 0, kinds: tuple[str, ...] = (BOOTSTRAP,),
                      row: Any = None) -> Launch:
    row = row or _token(conn, token)
    if row is None or row.kind not in kinds:
        raise Refused(403, "unknown bootstrap token")
    if now > row.expires + grace:
        raise Refused(403, f"{row.kind} token of launch {row.launch_id} expired {int(now - row.expires)} s ago")
    return _launch(conn, row.launch_id)


def _check_room(conn: Any, launch: Launch, pilot_id: str) -> None:
    bound = conn.execute(select(bindings.c.launch_id).where(
        bindings.c.entry == launch.entry, bindings.c.pilot_id == pilot_id)).first()
    if bound is not None:
        raise Refused(403, f"instance {pilot_id} already exchanged its bootstrap token (launch {bound.launch_id})")
    used = conn.execute(select(func.count()).select_from(bindings).where(
        bindings.c.launch_id == launch.launch_id)).scalar_one()
    if used >= launch.count:
        raise Refused(403, f"all {launch.count} exchanges of launch {launch.launch_id} are used")


InLaunch = Callable[[Launch, str], bool]


def _check_listed(in_launch: InLaunch, launch: Launch, pilot_id: str) -> None:
    if not in_launch(launch, pilot_id):
        raise Refused(403, f"instance {pilot_id} is not an instance of launch {launch.launch_id} at entry {launch.entry}")


def exchange(
    st: StateStore, token: str, pilot_id: str, now: float, in_launch: InLaunch,
    prepare: Callable[[Launch], T] = lambda launch: None,
) -> tuple[Launch, str, float, T]:
    """Bind ``pilot_id`` to the token's launch; returns (launch, upload token, its expiry, prepared).

    ``in_launch(launch, pilot_id)`` asks the provider's listing of the launch;
    it is called outside any transaction (a provider call must not hold a
    lock). ``prepare(launch)`` gathers what the exchange hands over; if it
    fails, nothing is bound and the pilot may try again.
    """
    with st.begin() as conn:
        launch = _bootstrap_launch(conn, token, now)
        _check_room(conn, launch, pilot_id)
    _check_listed(in_launch, launch, pilot_id)
    prepared = prepare(launch)
    p = launch.policy
    expires = now + p["max_lifetime"] + p.get("retire_window", 0) + UPLOAD_MARGIN
    upload = new_token()
    try:
        with st.begin() as conn:
            launch = _launch(conn, launch.launch_id, lock=True)
            _check_room(conn, launch, pilot_id)
            conn.execute(insert(bindings).values(entry=launch.entry, pilot_id=pilot_id,
                                                 launch_id=launch.launch_id, bound=now))
            conn.execute(insert(tokens).values(token_hash=token_hash(upload), kind=UPLOAD, launch_id=launch.launch_id,
                                               pilot_id=pilot_id, expires=expires))
    except IntegrityError:  # another replica bound this instance between our two transactions
        raise Refused(403, f"instance {pilot_id} already exchanged its bootstrap token") from None
    return launch, upload, expires, prepared


def uploader(st: StateStore, token: str, now: float, claimed: str | None, in_launch: InLaunch) -> tuple[str, str]:
    """(entry, pilot id) whose logs ``token`` may write.

    An upload token names its pilot. A bootstrap token (a wrapper that failed
    before the exchange) writes for the instance it claims, if the provider
    lists that instance under the token's launch.
    """
    with st.begin() as conn:
        row = _token(conn, token)
        if row is not None and row.kind == UPLOAD:
            if now > row.expires:
                raise Refused(403, f"upload token of pilot {row.pilot_id} expired")
            return _launch(conn, row.launch_id).entry, row.pilot_id
        launch = _bootstrap_launch(conn, token, now, grace=LOG_GRACE, kinds=(BOOTSTRAP, LOG), row=row)
        if row.kind == LOG and claimed:  # readable in UserData: never for a pilot that has its upload token
            bound = conn.execute(select(bindings.c.launch_id).where(
                bindings.c.entry == launch.entry, bindings.c.pilot_id == claimed)).first()
            if bound is not None:
                raise Refused(403, f"instance {claimed} has exchanged its token: its logs need its upload token")
    if not claimed:
        raise Refused(400, "a log upload with a bootstrap token must name its instance_id")
    _check_listed(in_launch, launch, claimed)
    return launch.entry, claimed
