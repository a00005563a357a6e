"""The factory's envelope signing keys, and the image keys sealed envelopes are encrypted for.

The signing key is the Airflow connection ``[glidein] signing_key_conn_id``
(default ``glidein_signing_key``; its password holds an Ed25519 PEM private
key or base64 of the 32-byte seed), so any secrets backend works. During a
rotation the previous key is still accepted: the connection
``[glidein] signing_key_previous_conn_id`` or the extra ``previous_key`` of
the signing connection (its public PEM is enough). The factory signs with
the current key only; the bootstrap service serves both public halves.

A configured connection that cannot be read or parsed fails closed: a
connection named in the Airflow config, or one this state store has signed
with before (Airflow reports a secrets backend that is down as a missing
connection), must be there. Only a factory that never had one generates a
key, once, into the shared state store, and the log says so: fine for a
demo, in production configure the connection and bake its public key
(``python -m airflow_glidein pubkey``) into the image.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from sqlalchemy import Column, Float, String, Table, Text, insert, select, update
from sqlalchemy.exc import IntegrityError

from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.state import METADATA, StateStore

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "glidein_signing_key"
CACHE_TTL = 60.0  # s a process keeps the keys it read: a switched connection takes effect within it
keys = Table(
    "glidein_keys", METADATA,
    Column("name", String(64), primary_key=True),  # GENERATED: the demo key; CONNECTION: the id signed with
    Column("secret", Text, nullable=False),
    Column("created", Float, nullable=False),
)
GENERATED = "signing"  # secret: the generated key's PEM (no connection configured)
CONNECTION = "signing_conn"  # secret: not a secret, the id of the connection key last signed with


class KeyUnavailable(userdata.EnvelopeError):
    """A configured signing key that cannot be used; the message names the connection, never the key."""


@dataclass(frozen=True)
class KeyRing:
    """The key the factory signs with and the public keys an envelope may still be signed with."""

    signing: Ed25519PrivateKey
    previous: Ed25519PublicKey | None = None

    def accepted(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> public key, the current key first."""
        out = {userdata.key_id(self.signing): self.signing.public_key()}
        if self.previous is not None:
            out.setdefault(userdata.key_id(self.previous), self.previous)
        return out


_cache: dict[tuple[str, str, str | None], tuple[float, KeyRing]] = {}


def _option(name: str) -> str | None:
    """``[glidein] name`` (environment first: no Airflow import where it is set), None when unset."""
    value = os.environ.get(f"AIRFLOW__GLIDEIN__{name.upper()}")
    if value is None:
        from airflow.sdk import conf

        value = conf.get("glidein", name, fallback=None)
    return value or None


def _connection(cid: str, role: str, required: bool):
    """The connection, None when it is not defined and not ``required``; KeyUnavailable otherwise."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(cid)
    except AirflowNotFoundException:
        if required:
            raise KeyUnavailable(f"the {role} connection {cid} is not found (or its secrets backend did not "
                                 "answer); refusing to sign with a key the images would reject") from None
        return None
    except Exception as exc:  # a backend that denies or fails: never fall back to another key
        raise KeyUnavailable(f"cannot read the {role} connection {cid} ({type(exc).__name__}); refusing to sign "
                             "with a key the images would reject") from None


def _parse(cid: str, what: str, text: str, parse):
    try:
        return parse(text)
    except userdata.EnvelopeError as exc:
        raise KeyUnavailable(f"connection {cid}: {what}: {exc}") from None


def _recorded(st: StateStore) -> str | None:
    """The id of the connection key this store's factory last signed with."""
    with st.begin() as conn:
        row = conn.execute(select(keys.c.secret).where(keys.c.name == CONNECTION)).first()
    return row.secret if row else None


def _record(st: StateStore, kid: str) -> None:
    try:
        with st.begin() as conn:
            row = {"secret": kid, "created": time.time()}
            if not conn.execute(update(keys).where(keys.c.name == CONNECTION).values(**row)).rowcount:
                conn.execute(insert(keys).values(name=CONNECTION, **row))
    except IntegrityError:  # another process recorded it first
        pass


def _generated(st: StateStore) -> Ed25519PrivateKey:
    def read() -> str | None:
        with st.begin() as conn:
            row = conn.execute(select(keys.c.secret).where(keys.c.name == GENERATED)).first()
        return row.secret if row else None

    pem = read()
    if pem is None:
        try:
            with st.begin() as conn:
                conn.execute(insert(keys).values(name=GENERATED, secret=userdata.private_pem(userdata.generate_key()),
                                                 created=time.time()))
        except IntegrityError:  # another process made it first; use theirs
            pass
        pem = read()
    return userdata.private_key_from_text(pem)


def _previous(conn, previous_cid: str | None) -> Ed25519PublicKey | None:
    """The previous key: its own connection (password or extra public_key), or the signing connection's extra."""
    if previous_cid:
        prev = _connection(previous_cid, "previous signing key", required=True)
        text = prev.password or (prev.extra_dejson or {}).get("public_key")
        if not text:
            raise KeyUnavailable(f"connection {previous_cid} holds no previous signing key (set its password to the "
                                 "key, or extra public_key to its public PEM)")
        return _parse(previous_cid, "previous signing key", text, userdata.public_key_from_text)
    text = (conn.extra_dejson or {}).get("previous_key") if conn is not None else None
    return _parse(conn.conn_id, "extra previous_key", text, userdata.public_key_from_text) if text else None


def _load(st: StateStore, cid: str, previous_cid: str | None, explicit: bool) -> KeyRing:
    conn = _connection(cid, "signing key", required=explicit)
    if conn is None:
        before = _recorded(st)
        if before:
            raise KeyUnavailable(f"the signing key connection {cid} is not found, but this factory signed with its "
                                 f"key id {before} before (a secrets backend that does not answer looks the same); "
                                 "refusing to sign with a generated key the images would reject")
        if previous_cid:
            raise KeyUnavailable(f"[glidein] signing_key_previous_conn_id names {previous_cid}, but there is no "
                                 f"signing key connection {cid} to rotate from")
        log.warning("No Airflow connection %s: signing UserData envelopes with a key generated into the state "
                    "store (fine for a demo; in production set the connection and bake its public key into "
                    "the image)", cid)
        return KeyRing(_generated(st))
    text = conn.password or (conn.extra_dejson or {}).get("private_key")
    if not text:
        raise KeyUnavailable(f"connection {cid} holds no signing key (set its password to the PEM key)")
    ring = KeyRing(_parse(cid, "signing key", text, userdata.private_key_from_text), _previous(conn, previous_cid))
    kid = userdata.key_id(ring.signing)
    if _recorded(st) != kid:
        _record(st, kid)
    return ring


def key_ring(st: StateStore) -> KeyRing:
    """The signing key and the previous one (cached per process for CACHE_TTL)."""
    explicit = _option("signing_key_conn_id")
    cid, previous_cid = explicit or DEFAULT_CONN_ID, _option("signing_key_previous_conn_id")
    key = (st.url, cid, previous_cid)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is None or now - hit[0] >= CACHE_TTL:
        hit = _cache[key] = (now, _load(st, cid, previous_cid, explicit is not None))
    return hit[1]


def signing_key(st: StateStore) -> Ed25519PrivateKey:
    return key_ring(st).signing


def public_pem(st: StateStore) -> str:
    return userdata.public_pem(signing_key(st))


def image_public_key(entry: Entry) -> X25519PublicKey:
    """The X25519 public key an entry's envelopes are sealed for (inline in the config, or a connection)."""
    enc = entry.encrypt_userdata
    assert enc is not None
    if enc.public_key:
        return userdata.image_public_from_text(enc.public_key)
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(enc.conn_id)
    except AirflowNotFoundException:
        raise userdata.EnvelopeError(f"entry {entry.name}: no Airflow connection {enc.conn_id} holding the image's "
                                     "public key (encrypt_userdata.conn_id)") from None
    text = conn.password or (conn.extra_dejson or {}).get("public_key")
    if not text:
        raise userdata.EnvelopeError(f"entry {entry.name}: connection {enc.conn_id} holds no image public key "
                                     "(set its password, or extra public_key)")
    try:
        return userdata.image_public_from_text(text)
    except userdata.EnvelopeError as exc:
        raise userdata.EnvelopeError(f"entry {entry.name}: connection {enc.conn_id}: {exc}") from None
