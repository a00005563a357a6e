"""What each kind of credential holds, and what can be read from it without trusting it.

Pure functions over a connection's fields (no Airflow here; the edge is
``airflow_glidein.secrets``). ``inspect`` never raises and its reasons never
quote the material: a malformed secret is described, not printed.

Where each kind lives in its Airflow connection:

=========================  =================  ==============================================
credential type            connection type    fields
=========================  =================  ==============================================
x509_proxy                 glidein_x509       extra.proxy (PEM: certificate, key, chain)
ec2_key_pair               aws                login/password or extra.aws_access_key_id/
                                              aws_secret_access_key (none: the default chain)
openstack_app_credential   glidein_openstack  host=auth URL, login=credential id, password
openstack_password         glidein_openstack  host=auth URL, login=user, password,
                                              extra.project_name or project_id, domains
opennebula_password        glidein_opennebula host=XML-RPC URL, login=user, password
idtoken, scitoken          glidein_token      password (or extra.token): the JWT
ssh_key                    glidein_ssh        login=key pair name, extra.private_key
=========================  =================  ==============================================

Any of them may carry extra.expires_at (ISO 8601 or epoch seconds) for
material whose expiry cannot be read from it (an application credential).
Which connection types may hold which credential type, and which reader
below reads it, is declared in ``airflow_glidein.middlewares`` (an installed
middleware may bring kinds of its own).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

CLOCK_SKEW = 300  # s a not-before in the future is tolerated (clocks differ)

# extra keys whose values are secret (besides the password field)
SECRET_EXTRA = ("proxy", "token", "private_key", "passphrase", "aws_secret_access_key", "aws_session_token",
                "application_credential_secret", "password")
OPENSTACK_AUTH = {"openstack_app_credential": "application_credential", "openstack_password": "password"}

_PEM_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S)


@dataclass(frozen=True)
class ConnFields:
    """A connection's fields as read at the edge; secrets stay out of repr."""

    conn_type: str
    host: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str | None = None
    port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def get(self, key: str) -> Any:
        value = self.extra.get(key)
        return value.strip() if isinstance(value, str) else value


@dataclass(frozen=True)
class Validity:
    """What reading a credential told us."""

    ok: bool
    reason: str = ""
    remaining: float | None = None  # seconds of lifetime left; None: does not expire
    info: Mapping[str, Any] = field(default_factory=dict)  # subject, issuer, audience...: never secret


class Invalid(ValueError):
    """A credential that cannot be used; the message never quotes the material."""


def inspect(cred_type: str, conn: ConnFields, now: float) -> Validity:
    """Read what can be read from a credential; never raises."""
    from airflow_glidein.middlewares import credential_type  # it imports the readers below

    try:
        kind = credential_type(cred_type)
        if conn.conn_type not in kind.conn_types:
            raise Invalid(f"connection type is {conn.conn_type!r}; a {cred_type} needs {' or '.join(kind.conn_types)}")
        expires, info = kind.read(conn, now)
        declared = _declared_expiry(conn)
        if declared is not None and (expires is None or declared < expires):
            expires = declared
            info = {**info, "expires_at": _iso(declared)}
        remaining = None if expires is None else expires - now
        if remaining is not None and remaining <= 0:
            return Validity(False, f"expired {duration(-remaining)} ago ({_iso(expires)})", remaining, info)
        return Validity(True, "", remaining, info)
    except Invalid as exc:
        return Validity(False, str(exc))
    except Exception as exc:  # a reader bug must not leak material or stop the cycle
        return Validity(False, f"cannot be read ({type(exc).__name__})")


def secret_values(conn: ConnFields) -> list[str]:
    """Every string that must be masked: each private key block of a PEM, else the whole value, and a JWT's signature.

    Few and short on purpose: the masker recompiles one regex per added
    secret, so masking every line of every key costs seconds per task.
    Certificates are public and stay readable.
    """
    values = [conn.password] + [conn.get(k) for k in SECRET_EXTRA]
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            continue
        v = v.strip()
        keys = [k.group(0) for k in _PEM_KEY.finditer(v)]
        out += keys if keys else [v]
        if v.count(".") == 2 and " " not in v:  # a JWT: its signature alone
            sig = v.rsplit(".", 1)[1]
            if len(sig) >= 16:
                out.append(sig)
    return list(dict.fromkeys(out))


# -- readers: (expiry epoch or None, info) or raise Invalid -----------------


def read_x509_proxy(conn: ConnFields, now: float) -> tuple[float | None, dict]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = conn.get("proxy") or (conn.password or "").strip()
    if not pem:
        raise Invalid("no PEM in the connection (extra field 'proxy')")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise Invalid("malformed PEM: no readable certificate") from None
    keys = list(_PEM_KEY.finditer(pem))
    if not keys:
        raise Invalid("no private key in the PEM (a proxy holds its key)")
    try:
        key = serialization.load_pem_private_key(keys[0].group(0).encode(), password=None)
    except TypeError:
        raise Invalid("the private key is encrypted (a proxy's key is not)") from None
    except ValueError:
        raise Invalid("malformed PEM: the private key cannot be read") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise Invalid("the private key does not belong to the first certificate")
    not_before = max(c.not_valid_before_utc for c in certs).timestamp()
    if not_before > now + CLOCK_SKEW:
        raise Invalid(f"not valid before {_iso(not_before)}")
    leaf = certs[0]
    expires = min(c.not_valid_after_utc for c in certs).timestamp()  # a chain lives as long as its shortest link
    return expires, {"subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
                     "not_after": _iso(expires), "chain": len(certs)}


def decode_jwt(token: str) -> tuple[dict, dict]:
    """A JWT's header and claims, without verifying its signature (we only read dates and names)."""
    import json  # here, not at the top: the configuration imports this module and stays cheap

    parts = token.strip().split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise Invalid("not a JWT (expected header.claims.signature)")
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2])
    except (ValueError, binascii.Error):
        raise Invalid("not a JWT (header or claims are not base64url JSON)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Invalid("not a JWT (header or claims are not JSON objects)")
    return header, claims


def read_token(conn: ConnFields, now: float) -> tuple[float | None, dict]:
    token = (conn.password or "").strip() or conn.get("token")
    if not token:
        raise Invalid("no token in the connection (password field)")
    _, claims = decode_jwt(token)
    for name in ("exp", "nbf"):
        if name in claims and not isinstance(claims[name], (int, float)):
            raise Invalid(f"the {name} claim is not a number")
    if claims.get("nbf", 0) > now + CLOCK_SKEW:
        raise Invalid(f"not valid before {_iso(claims['nbf'])}")
    info = {k: claims[k] for k in ("iss", "aud", "sub", "scope") if k in claims}
    exp = claims.get("exp")
    info["exp"] = _iso(exp) if exp is not None else None
    return (float(exp) if exp is not None else None), info


def read_ssh_key(conn: ConnFields, now: float) -> tuple[float | None, dict]:
    from cryptography.hazmat.primitives import serialization

    text = conn.get("private_key") or (conn.password or "").strip()
    if not text:
        raise Invalid("no private key in the connection (extra field 'private_key')")
    phrase = conn.get("passphrase")
    phrase = phrase.encode() if phrase else None
    try:
        if "OPENSSH PRIVATE KEY" in text:
            key = serialization.load_ssh_private_key(text.encode(), password=phrase)
        else:
            key = serialization.load_pem_private_key(text.encode(), password=phrase)
    except TypeError:
        raise Invalid("the private key is encrypted and no passphrase fits") from None
    except ValueError:
        raise Invalid("malformed private key") from None
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(pub.split()[1])).digest()).decode().rstrip("=")
    return None, {"key_name": conn.login, "fingerprint": f"SHA256:{digest}"}


def read_aws(conn: ConnFields, now: float) -> tuple[float | None, dict]:
    key_id = conn.login or conn.get("aws_access_key_id")
    secret = conn.password or conn.get("aws_secret_access_key")
    if bool(key_id) != bool(secret):
        raise Invalid("an access key id without its secret (or a secret without its id)")
    if not key_id:
        return None, {"access_key": "default chain (environment, instance profile, role)"}
    return None, {"access_key": f"...{key_id[-4:]}"}


def _url(conn: ConnFields, what: str) -> str:
    host = (conn.host or "").strip()
    if not re.match(r"^https?://[^/\s]+", host):
        raise Invalid(f"the host field must be the {what} URL (http[s]://...)")
    return host


def read_openstack(kind: str):
    def read(conn: ConnFields, now: float) -> tuple[float | None, dict]:
        url = _url(conn, "Keystone auth")
        declared = conn.get("auth_type")
        if declared and declared != OPENSTACK_AUTH[kind]:
            raise Invalid(f"the connection's auth_type is {declared!r}; a {kind} needs {OPENSTACK_AUTH[kind]!r}")
        if not conn.login or not conn.password:
            who = "application credential id" if kind == "openstack_app_credential" else "user name"
            raise Invalid(f"login ({who}) and password are both required")
        info = {"auth_url": url, "auth_type": OPENSTACK_AUTH[kind], "login": conn.login}
        if kind == "openstack_password":
            project = conn.get("project_name") or conn.get("project_id")
            if not project:
                raise Invalid("password auth needs extra.project_name or extra.project_id")
            info["project"] = project
        return None, info

    return read


def read_opennebula(conn: ConnFields, now: float) -> tuple[float | None, dict]:
    url = _url(conn, "XML-RPC endpoint")
    if not conn.login or not conn.password:
        raise Invalid("login (user) and password are both required")
    return None, {"endpoint": url, "user": conn.login}


# -- what the middleware hooks take -----------------------------------------


def openstack_auth(cred_type: str, conn: ConnFields) -> dict[str, Any]:
    """openstacksdk ``connect()`` arguments for a checked OpenStack credential."""
    if cred_type == "openstack_app_credential":
        auth = {"auth_url": conn.host, "application_credential_id": conn.login,
                "application_credential_secret": conn.password}
        auth_type = "v3applicationcredential"
    else:
        auth = {"auth_url": conn.host, "username": conn.login, "password": conn.password,
                "user_domain_name": conn.get("user_domain_name") or "Default",
                "project_domain_name": conn.get("project_domain_name") or "Default"}
        auth.update({k: conn.get(k) for k in ("project_name", "project_id") if conn.get(k)})
        auth_type = "password"
    out = {"auth_type": auth_type, "auth": auth}
    if conn.get("region_name"):
        out["region_name"] = conn.get("region_name")
    return out


def pilot_payload(cred_type: str, conn: ConnFields) -> str:
    """What the bootstrap exchange hands a pilot: the token, or the proxy's PEM."""
    if cred_type in ("idtoken", "scitoken"):
        return (conn.password or "").strip() or str(conn.get("token") or "")
    if cred_type == "x509_proxy":
        return conn.get("proxy") or (conn.password or "").strip()
    raise ValueError(f"a {cred_type} is not handed to pilots")


def describe(v: Validity) -> str:
    """One line for a log: what was read (never secret) and how long it lasts."""
    left = "does not expire" if v.remaining is None else f"{duration(v.remaining)} left"
    facts = ", ".join(f"{k}={val}" for k, val in v.info.items() if val not in (None, ""))
    return f"{left}; {facts}" if facts else left


def opennebula_session(conn: ConnFields) -> tuple[str, str]:
    """pyone ``OneServer(endpoint, session=...)`` arguments."""
    return str(conn.host), f"{conn.login}:{conn.password}"


# -- small helpers ------------------------------------------------------------


def _declared_expiry(conn: ConnFields) -> float | None:
    value = conn.get("expires_at")
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise Invalid("extra.expires_at is neither ISO 8601 nor epoch seconds") from None
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """A readable span: 45 s, 12 min, 3.5 h, 2.0 d."""
    s = abs(seconds)
    if s < 120:
        return f"{int(s)} s"
    if s < 3600:
        return f"{int(s // 60)} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
