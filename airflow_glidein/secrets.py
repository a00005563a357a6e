"""Credential material from Airflow connections: the only place it is read.

Any Airflow secrets backend works, since connections are fetched through the
Task SDK. Every secret value is registered with Airflow's secrets masker as it
is read (Airflow masks a connection's password and its extra as one string,
not a PEM key or a token inside the extra, nor a key's lines one by one), so
no task log shows it. What leaves this module is a ``Validity`` (dates and
names) or, for the hooks and the bootstrap exchange, the fields themselves,
which never go to XCom.

The ``CredentialHook`` classes give each custom connection type its form in
the Airflow UI and a "Test" button that reads and checks the material; which
credential types a connection type holds is read from
``airflow_glidein.middlewares``, so a middleware that brings a connection
type only subclasses ``CredentialHook`` with its ``conn_type``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.log import mask_secret

from airflow_glidein import material, middlewares
from airflow_glidein.config import Config, Credential
from airflow_glidein.material import ConnFields, Validity


def read_conn(conn_id: str) -> ConnFields:
    """A connection's fields, its secrets masked before they are returned."""
    conn = BaseHook.get_connection(conn_id)
    fields = ConnFields(
        conn_type=conn.conn_type or "",
        host=conn.host,
        login=conn.login,
        password=conn.password,
        schema=conn.schema,
        port=conn.port,
        extra=conn.extra_dejson or {},
    )
    for value in material.secret_values(fields):
        mask_secret(value)
    return fields


def read(cred: Credential) -> ConnFields:
    return read_conn(cred.conn_id)


def check(config: Config, ids: Iterable[str], now: float | None = None) -> dict[str, Validity]:
    """Validity of each credential; a missing or unreadable connection is a reason, never an exception."""
    now = time.time() if now is None else now
    out = {}
    for cid in ids:
        cred = config.credential(cid)
        try:
            fields = read(cred)
        except AirflowNotFoundException:
            out[cid] = Validity(False, f"connection {cred.conn_id!r} not found")
            continue
        except Exception as exc:  # e.g. a malformed AIRFLOW_CONN_* value; its text may quote the secret
            out[cid] = Validity(False, f"connection {cred.conn_id!r} cannot be read ({type(exc).__name__})")
            continue
        out[cid] = material.inspect(cred.type, fields, now)
    return out


def pilot_payload(config: Config, cred_id: str) -> str:
    """The pilot credential's secret, for the bootstrap exchange only (never UserData, XCom or logs)."""
    cred = config.credential(cred_id)
    if cred.purpose != "pilot":
        raise ValueError(f"credential {cred_id!r} is a {cred.purpose} credential, not a pilot credential")
    return material.pilot_payload(cred.type, read(cred))


class CredentialHook(BaseHook):
    """Reads and checks one credential connection; subclasses name the connection type, whose first
    credential type (in airflow_glidein.middlewares) is the one read unless ``cred_type`` says otherwise."""

    conn_name_attr = "glidein_credential_conn_id"
    default_conn_name = "glidein_credential_default"
    conn_type = ""
    hook_name = "Glidein credential"

    def __init__(self, glidein_credential_conn_id: str = default_conn_name, cred_type: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = glidein_credential_conn_id
        self.cred_type = cred_type

    @cached_property
    def fields(self) -> ConnFields:
        return read_conn(self.conn_id)

    def kind(self) -> str:
        return self.cred_type or middlewares.credential_types_for(self.conn_type)[0]

    def validity(self, now: float | None = None) -> Validity:
        return material.inspect(self.kind(), self.fields, time.time() if now is None else now)

    def test_connection(self) -> tuple[bool, str]:
        try:
            v = self.validity()
        except Exception as exc:
            return False, f"cannot read the connection ({type(exc).__name__})"
        return (True, f"{self.kind()}: {material.describe(v)}") if v.ok else (False, f"{self.kind()}: {v.reason}")


class X509ProxyHook(CredentialHook):
    conn_type = "glidein_x509"
    hook_name = "Glidein x509 proxy"


class TokenHook(CredentialHook):
    conn_type = "glidein_token"
    hook_name = "Glidein bearer token (IDTOKEN, SciToken)"


class SSHKeyHook(CredentialHook):
    conn_type = "glidein_ssh"
    hook_name = "Glidein SSH key pair"


class OpenStackCredentialHook(CredentialHook):
    conn_type = "glidein_openstack"
    hook_name = "Glidein OpenStack credential"

    def kind(self) -> str:
        if self.cred_type:
            return self.cred_type
        declared = self.fields.get("auth_type")
        return {v: k for k, v in material.OPENSTACK_AUTH.items()}.get(declared) or super().kind()

    def connect_args(self) -> dict[str, Any]:
        """openstacksdk ``connect()`` arguments (for the OpenStack pilot hook)."""
        return material.openstack_auth(self.kind(), self.fields)


class OpenNebulaCredentialHook(CredentialHook):
    conn_type = "glidein_opennebula"
    hook_name = "Glidein OpenNebula user"

    def session(self) -> tuple[str, str]:
        """pyone ``OneServer`` endpoint and session (for the OpenNebula pilot hook)."""
        return material.opennebula_session(self.fields)
