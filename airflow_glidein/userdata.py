"""The UserData envelope: the only dynamic input a cloud VM gets.

It names the launch, says where to fetch the startup script (and its
SHA-256), carries a short-lived bootstrap token and the pilot policy, and is
signed by the factory with Ed25519. It never carries a long-lived secret (the
provider, and anyone on the VM, can read UserData). Each middleware caps its
size; a too-large envelope is refused here with a clear error instead of by
the provider.

Format (three lines, so a POSIX sh wrapper reads it with sed and base64)::

    #glidein-envelope v1
    <base64 of the body: sorted "key=value" lines>
    <base64 of the Ed25519 signature over the body bytes>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
HEADER = "#glidein-envelope"
# Raw bytes before any transport encoding. EC2: 16 KB before base64; Nova: 64 KB;
# OpenNebula puts it base64-encoded into a CONTEXT variable (we keep the same cap).
MAX_BYTES = {"ec2": 16384, "openstack": 65535, "opennebula": 65535, "htcondor_g": 65535}
INT_FIELDS = {"v", "issued", "token_expires", "boot_timeout", "idle_timeout", "max_lifetime", "retire_window"}
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_BAD_VALUE = re.compile(r"[\x00-\x1f\x7f]")


class EnvelopeError(ValueError):
    """An envelope that cannot be built or trusted; the message says why."""


class UserDataTooLarge(EnvelopeError):
    pass


# -- keys -------------------------------------------------------------------
def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_from_text(text: str) -> Ed25519PrivateKey:
    """A signing key from PEM (PKCS#8) or base64 of the 32-byte seed."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error):
        raise EnvelopeError("the signing key is neither an Ed25519 PEM private key nor base64 of a 32-byte seed") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EnvelopeError("the signing key is not an Ed25519 key")
    return key


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(pem: str) -> str:
    """SHA-256 of the public key's PEM text: what an image pins (sha256sum of the file)."""
    return hashlib.sha256(pem.encode()).hexdigest()


def load_public_pem(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise EnvelopeError("the public key is not an Ed25519 key")
    return key


# -- body -------------------------------------------------------------------
def encode_body(payload: Mapping[str, Any]) -> bytes:
    lines = []
    for key in sorted(payload):
        value = payload[key]
        if not _KEY.match(key):
            raise EnvelopeError(f"envelope field name {key!r} is not lower-case [a-z0-9_]")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise EnvelopeError(f"envelope field {key} must be a string or an integer, not {type(value).__name__}")
        if _BAD_VALUE.search(str(value)):
            raise EnvelopeError(f"envelope field {key} holds a control character (newline?)")
        lines.append(f"{key}={value}\n")
    return "".join(lines).encode()


def decode_body(body: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in body.decode().splitlines():
        key, sep, value = line.partition("=")
        if not sep or not _KEY.match(key):
            raise EnvelopeError("envelope body line is not key=value")
        out[key] = int(value) if key in INT_FIELDS else value
    return out


# -- envelope ---------------------------------------------------------------
def build(middleware: str, payload: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The signed UserData text for ``middleware``; raises UserDataTooLarge past its limit."""
    body = encode_body({"v": VERSION, **payload})
    sig = key.sign(body)
    text = f"{HEADER} v{VERSION}\n{base64.b64encode(body).decode()}\n{base64.b64encode(sig).decode()}\n"
    limit = MAX_BYTES[middleware]
    size = len(text.encode())
    if size > limit:
        raise UserDataTooLarge(
            f"UserData envelope is {size} bytes, over the {middleware} limit of {limit} bytes "
            f"(largest fields: {', '.join(sorted(payload, key=lambda k: -len(str(payload[k])))[:3])})"
        )
    return text


def split(text: str) -> tuple[bytes, bytes]:
    """The body and signature bytes of an envelope (unverified)."""
    lines = text.strip().splitlines()
    if len(lines) != 3 or lines[0].strip() != f"{HEADER} v{VERSION}":
        raise EnvelopeError(f"not a glidein UserData envelope (want 3 lines starting with '{HEADER} v{VERSION}')")
    try:
        return base64.b64decode(lines[1], validate=True), base64.b64decode(lines[2], validate=True)
    except binascii.Error:
        raise EnvelopeError("envelope body or signature is not base64") from None


def parse(text: str, public_key: Ed25519PublicKey | None = None) -> dict[str, Any]:
    """The envelope's fields; with ``public_key``, only if the signature verifies."""
    body, sig = split(text)
    if public_key is not None:
        try:
            public_key.verify(sig, body)
        except InvalidSignature:
            raise EnvelopeError("envelope signature does not verify with the factory's public key") from None
    return decode_body(body)
