"""The envelope signing keys: fail closed, generate only without any connection, the previous key during a rotation.

Connections come from Airflow's environment-variable secrets backend
(``AIRFLOW_CONN_*``), read through the real ``BaseHook.get_connection``; the
service's key routes are the real bootstrap service inside Airflow's API server.
"""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import func, select

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import keys, tokens
from airflow_glidein.state import store

pytestmark = pytest.mark.usefixtures("airflow_db")
PASTED = "ghp_NotAKeyButASecretPastedInTheWrongPlace0123"


def set_conn(monkeypatch, conn_id: str, password: str | None = None, **extra) -> None:
    conn = {"conn_type": "generic", "extra": extra}
    if password is not None:
        conn["password"] = password
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def fresh(monkeypatch) -> None:
    """As after the process cache's minute: the next call reads the connections again."""
    monkeypatch.setattr(keys, "_cache", {})


def refused(capture) -> str:
    with pytest.raises(keys.KeyUnavailable) as exc:
        capture()
    return str(exc.value)


def generated_rows() -> int:
    with store().begin() as conn:
        return conn.execute(select(func.count()).select_from(keys.keys).where(keys.keys.c.name == keys.GENERATED)).scalar()


def test_without_any_connection_a_key_is_generated_once_and_said(caplog):
    with caplog.at_level("WARNING", logger="airflow_glidein.bootstrap.keys"):
        ring = keys.key_ring(store())
    assert "No Airflow connection glidein_signing_key: signing UserData envelopes with a key generated" in caplog.text
    assert ring.previous is None and list(ring.accepted()) == [U.key_id(ring.signing)]
    keys._cache.clear()
    assert U.key_id(keys.signing_key(store())) == U.key_id(ring.signing)  # the same key from the store
    assert generated_rows() == 1


@pytest.mark.parametrize("password, why", [
    (f"-----BEGIN PRIVATE KEY-----\n{PASTED}\n-----END PRIVATE KEY-----",
     "connection glidein_signing_key: signing key: the signing key is neither an Ed25519 PEM private key nor "
     "base64 of a 32-byte seed"),
    (PASTED, "connection glidein_signing_key: signing key: the signing key is neither an Ed25519 PEM private key "
             "nor base64 of a 32-byte seed"),
    ("", "connection glidein_signing_key holds no signing key (set its password to the PEM key)"),
])
def test_a_connection_that_cannot_be_parsed_fails_closed(monkeypatch, password, why):
    set_conn(monkeypatch, "glidein_signing_key", password)
    message = refused(lambda: keys.signing_key(store()))
    assert message == why and PASTED not in message
    assert generated_rows() == 0


def test_a_named_connection_that_is_missing_fails_closed(monkeypatch):
    monkeypatch.setenv("AIRFLOW__GLIDEIN__SIGNING_KEY_CONN_ID", "factory_ed25519")
    assert refused(lambda: keys.signing_key(store())) == (
        "the signing key connection factory_ed25519 is not found (or its secrets backend did not answer); "
        "refusing to sign with a key the images would reject")
    assert generated_rows() == 0


def test_a_connection_signed_with_before_and_now_not_found_fails_closed(monkeypatch):
    """Airflow reports a secrets backend that does not answer as a missing connection: never fall back then."""
    key = U.generate_key()
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(key))
    assert U.key_id(keys.signing_key(store())) == U.key_id(key)
    monkeypatch.delenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY")
    fresh(monkeypatch)
    assert refused(lambda: keys.signing_key(store())) == (
        f"the signing key connection glidein_signing_key is not found, but this factory signed with its key id "
        f"{U.key_id(key)} before (a secrets backend that does not answer looks the same); refusing to sign with "
        "a generated key the images would reject")
    assert generated_rows() == 0


def test_a_secrets_backend_that_fails_is_named_without_its_message(monkeypatch):
    from airflow.sdk import BaseHook

    def backend_down(conn_id):
        raise ConnectionError(f"vault at 10.0.0.5 refused token {PASTED}")

    monkeypatch.setattr(BaseHook, "get_connection", staticmethod(backend_down))
    message = refused(lambda: keys.signing_key(store()))
    assert message == ("cannot read the signing key connection glidein_signing_key (ConnectionError); refusing to "
                       "sign with a key the images would reject")
    assert PASTED not in message and generated_rows() == 0


def test_a_broken_key_registers_no_launch(ec2, monkeypatch, tmp_path):
    from airflow_glidein.bootstrap.launches import userdata_for
    from airflow_glidein.config import get_config
    from tests.helpers import example_config, write_config

    write_config(tmp_path, example_config(), monkeypatch)
    set_conn(monkeypatch, "glidein_signing_key", PASTED)
    cfg = get_config()
    entry = cfg.entry("aws-us-east-1")
    batch = {"launch_id": "l1.cms.aws-us-east-1.0", "frontend": "cms", "count": 2,
             "policy": cfg.policy_for(entry, "cms").model_dump()}
    with pytest.raises(keys.KeyUnavailable, match="connection glidein_signing_key: signing key"):
        userdata_for(cfg, entry, batch, "glidein_aws_demo")
    with store().begin() as conn:
        assert conn.execute(select(func.count()).select_from(tokens.launches)).scalar() == 0


def test_the_previous_key_from_its_own_connection_or_the_signing_connection(monkeypatch):
    new, old = U.generate_key(), U.generate_key()
    # its own connection: the private key (as it was the signing key) or only the public half
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(new))
    monkeypatch.setenv("AIRFLOW__GLIDEIN__SIGNING_KEY_PREVIOUS_CONN_ID", "glidein_signing_key_old")
    for conn in ({"password": U.private_pem(old)}, {"public_key": U.public_pem(old)}):
        set_conn(monkeypatch, "glidein_signing_key_old", conn.get("password"), **{k: v for k, v in conn.items()
                                                                                 if k != "password"})
        fresh(monkeypatch)
        ring = keys.key_ring(store())
        assert list(ring.accepted()) == [U.key_id(new), U.key_id(old)]
        assert U.key_id(ring.signing) == U.key_id(new)  # the factory signs with the current key only
    # or the signing connection's extra previous_key
    monkeypatch.delenv("AIRFLOW__GLIDEIN__SIGNING_KEY_PREVIOUS_CONN_ID")
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(new), previous_key=U.public_pem(old))
    fresh(monkeypatch)
    assert list(keys.key_ring(store()).accepted()) == [U.key_id(new), U.key_id(old)]


def test_a_configured_previous_key_that_cannot_be_read_fails_closed(monkeypatch):
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(U.generate_key()))
    monkeypatch.setenv("AIRFLOW__GLIDEIN__SIGNING_KEY_PREVIOUS_CONN_ID", "glidein_signing_key_old")
    assert refused(lambda: keys.key_ring(store())) == (
        "the previous signing key connection glidein_signing_key_old is not found (or its secrets backend did not "
        "answer); refusing to sign with a key the images would reject")
    set_conn(monkeypatch, "glidein_signing_key_old", public_key=PASTED)
    message = refused(lambda: keys.key_ring(store()))
    assert message.startswith("connection glidein_signing_key_old: previous signing key: ") and PASTED not in message
    monkeypatch.delenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY")
    assert refused(lambda: keys.key_ring(store())) == (
        "[glidein] signing_key_previous_conn_id names glidein_signing_key_old, but there is no signing key "
        "connection glidein_signing_key to rotate from")


def test_the_service_serves_the_current_and_the_previous_key_by_id(bootstrap_server, monkeypatch):
    new, old = U.generate_key(), U.generate_key()
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(new), previous_key=U.private_pem(old))
    base = f"{bootstrap_server.url}/glidein/bootstrap"
    assert httpx.get(f"{base}/pubkey.pem").text == U.public_pem(new)
    assert httpx.get(f"{base}/pubkeys/{U.key_id(new)}.pem").text == U.public_pem(new)
    assert httpx.get(f"{base}/pubkeys/{U.key_id(old)}.pem").text == U.public_pem(old)
    other = httpx.get(f"{base}/pubkeys/{U.key_id(U.generate_key())}.pem")
    assert other.status_code == 404 and "no such factory key" in other.text
    # a key that cannot be read: 503 to the pilot, without the connection's name or content
    set_conn(monkeypatch, "glidein_signing_key", PASTED)
    fresh(monkeypatch)
    down = httpx.get(f"{base}/pubkey.pem")
    assert down.status_code == 503 and down.text == "error=the factory's signing key is unavailable now; try again\n"


def test_preflight_names_the_key_ids_and_a_key_that_cannot_sign(bootstrap_server, monkeypatch):
    from airflow_glidein import preflight

    new, old = U.generate_key(), U.generate_key()
    set_conn(monkeypatch, "glidein_signing_key", U.private_pem(new), previous_key=U.public_pem(old))
    check = preflight._bootstrap(f"{bootstrap_server.url}/glidein")
    assert check.ok and check.detail == (f"answers, same signing key and state store (key id {U.key_id(new)}; "
                                         f"previous key id {U.key_id(old)} still accepted)")
    set_conn(monkeypatch, "glidein_signing_key", PASTED)
    fresh(monkeypatch)
    check = preflight._bootstrap(f"{bootstrap_server.url}/glidein")
    assert not check.ok and check.detail.startswith("the factory cannot sign: connection glidein_signing_key: ")
    assert PASTED not in check.detail
