"""The factory's envelope signing key, and the image keys sealed envelopes are encrypted for.

From the Airflow connection ``[glidein] signing_key_conn_id`` (default
``glidein_signing_key``; its password holds an Ed25519 PEM private key or
base64 of the 32-byte seed), so any secrets backend works. Without that
connection a key is generated once into the shared state store, and the log
says so: fine for a demo, in production configure the connection and bake
its public key (``python -m airflow_glidein pubkey``) into the image.
"""

from __future__ import annotations

import logging
import os
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from sqlalchemy import Column, Float, String, Table, Text, insert, select
from sqlalchemy.exc import IntegrityError

from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.state import METADATA, StateStore

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "glidein_signing_key"
keys = Table(
    "glidein_keys", METADATA,
    Column("name", String(64), primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created", Float, nullable=False),
)
_cache: dict[str, Ed25519PrivateKey] = {}


def conn_id() -> str:
    cid = os.environ.get("AIRFLOW__GLIDEIN__SIGNING_KEY_CONN_ID")
    if cid:
        return cid
    from airflow.sdk import conf

    return conf.get("glidein", "signing_key_conn_id", fallback=DEFAULT_CONN_ID)


def _from_connection(cid: str) -> Ed25519PrivateKey | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(cid)
    except AirflowNotFoundException:
        return None
    text = conn.password or (conn.extra_dejson or {}).get("private_key")
    if not text:
        raise userdata.EnvelopeError(f"connection {cid} holds no signing key (set its password to the PEM key)")
    return userdata.private_key_from_text(text)


def _from_store(st: StateStore) -> Ed25519PrivateKey:
    def read() -> str | None:
        with st.begin() as conn:
            row = conn.execute(select(keys.c.secret).where(keys.c.name == "signing")).first()
        return row.secret if row else None

    pem = read()
    if pem is None:
        try:
            with st.begin() as conn:
                conn.execute(insert(keys).values(name="signing", secret=userdata.private_pem(userdata.generate_key()),
                                                 created=time.time()))
        except IntegrityError:  # another process made it first; use theirs
            pass
        pem = read()
    return userdata.private_key_from_text(pem)


def signing_key(st: StateStore) -> Ed25519PrivateKey:
    """The signing key (cached per process and source)."""
    cid = conn_id()
    key = _cache.get(f"conn:{cid}") or _from_connection(cid)
    if key is not None:
        _cache[f"conn:{cid}"] = key
        return key
    if st.url not in _cache:
        log.warning("No Airflow connection %s: signing UserData envelopes with a key generated into the state "
                    "store (fine for a demo; in production set the connection and bake its public key into "
                    "the image)", cid)
        _cache[st.url] = _from_store(st)
    return _cache[st.url]


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
