"""The UserData envelope: the only dynamic input a cloud VM gets.

It names the launch, says where to fetch the startup script (and its
SHA-256), carries a short-lived bootstrap token and the pilot policy, and is
signed by the factory with Ed25519. It never carries a long-lived secret (the
provider, and anyone on the VM, can read UserData). Each middleware caps its
size (``airflow_glidein.middlewares``); a too-large envelope is refused here
with a clear error instead of by the provider.

Format (three lines, so a POSIX sh wrapper reads it with sed and base64)::

    #glidein-envelope v1
    <base64 of the body: sorted "key=value" lines>
    <base64 of the Ed25519 signature over the body bytes>

The signed body names the signing key (``key_id``: the first 16 hex digits
of SHA-256 over its raw 32-byte public key), so an image that carries the
current and the previous factory key during a rotation checks the envelope
with the one it names.

Sealed (an entry with ``encrypt_userdata``): the header reads
``#glidein-envelope v1 sealed`` and the signed body holds, besides
``bootstrap_url`` and a log-only token in the clear, the real body encrypted
for the VM image's X25519 key (encrypt-then-sign, so a forged or altered
envelope is refused before anything is decrypted)::

    ct=<base64 of "Salted__" + salt + ChaCha20 ciphertext>   epk=<base64 ephemeral public key, DER>
    recipient=<SHA-256 of the image's public key, DER>     sealed=x25519-pbkdf2-sha256-chacha20

The cipher is what ``openssl enc -d -chacha20 -pbkdf2 -iter 1 -md sha256
-pass file:F`` undoes (OpenSSL 1.1.1+), F holding the hex of the X25519
shared secret (``openssl pkeyutl -derive``): the secret never appears on a
command line, where any user of the VM could read it (HKDF is reachable from
openssl's CLI only that way). PBKDF2-HMAC-SHA256 with one iteration and a
random salt is an HMAC-based KDF; its input is a full-entropy ECDH secret, so
it needs no stretching. Every key is ephemeral, so one salt never repeats a
key stream. The VM's python3 fallback does the same with the standard library
(pilot/x25519_open.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from airflow_glidein import middlewares

VERSION = 1
HEADER = "#glidein-envelope"
SEALED = "sealed"  # the header's third word for an encrypted envelope
SEAL_ALG = "x25519-pbkdf2-sha256-chacha20"
CLEAR_FIELDS = ("bootstrap_url",)  # what a sealed envelope keeps readable (the wrapper's failure log needs it)
INT_FIELDS = {"v", "issued", "token_expires", "boot_timeout", "idle_timeout", "max_lifetime", "retire_window"}
KEY_ID_HEX = 16  # hex digits of a signing key's id
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KEY_ID_LINE = re.compile(rb"^key_id=([0-9a-f]{%d})$" % KEY_ID_HEX, re.M)
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


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """A verifying key from its public PEM, or the public half of a private key (PEM or seed); never echoed."""
    text = text.strip()
    if not text.startswith("-----BEGIN PUBLIC KEY-----"):
        return private_key_from_text(text).public_key()
    try:
        return load_public_pem(text)
    except ValueError:
        raise EnvelopeError("the public key is not an Ed25519 PEM public key") from None


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The envelope's name for a signing key: the first 16 hex digits of SHA-256 over its raw public key.

    The wrapper computes the same from a baked PEM (``ed25519_verify.py keyid``,
    or ``openssl pkey -pubin -outform DER | tail -c 32 | sha256sum``).
    """
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(pub.public_bytes_raw()).hexdigest()[:KEY_ID_HEX]


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


# -- the image key (X25519) for sealed envelopes ---------------------------
_X25519_SPKI = bytes.fromhex("302a300506032b656e032100")


def generate_image_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def image_key_from_text(text: str) -> X25519PrivateKey:
    """The VM image's private key from PEM (PKCS#8), as ``openssl genpkey -algorithm X25519`` writes it."""
    try:
        key = serialization.load_pem_private_key(text.strip().encode(), password=None)
    except (ValueError, TypeError):
        raise EnvelopeError("the image key is not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise EnvelopeError("the image key is not an X25519 key")
    return key


def image_public_from_text(text: str) -> X25519PublicKey:
    """The image's public key: PEM, or base64 of its DER (the PEM's body) or of its 32 raw bytes.

    Messages never echo the text (a private key pasted here must not reach a log).
    """
    text = text.strip()
    if "PRIVATE KEY" in text:
        raise EnvelopeError("this is a private key: the factory needs only the image's public key "
                            "(openssl pkey -in userdata.key -pubout); keep the private key in the image")
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            raw = base64.b64decode("".join(text.split()), validate=True)
            key = (X25519PublicKey.from_public_bytes(raw) if len(raw) == 32
                   else serialization.load_der_public_key(raw))
    except (ValueError, TypeError, binascii.Error):
        raise EnvelopeError("the image public key is neither PEM nor base64 of an X25519 public key") from None
    if not isinstance(key, X25519PublicKey):
        raise EnvelopeError("the image public key is not an X25519 key (openssl genpkey -algorithm X25519)")
    return key


def _spki(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def image_public_pem(key: X25519PrivateKey | X25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def image_fingerprint(key: X25519PrivateKey | X25519PublicKey) -> str:
    """SHA-256 of the public key's DER: ``openssl pkey -in K -pubout -outform DER | sha256sum``."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return hashlib.sha256(_spki(pub)).hexdigest()


def _key_iv(secret: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """ChaCha20 key and IV as ``openssl enc -chacha20 -pbkdf2 -iter 1 -md sha256`` derives them from the password."""
    km = PBKDF2HMAC(hashes.SHA256(), 48, salt, 1).derive(secret.hex().encode())
    return km[:32], km[32:]


def _fits_counter(iv: bytes, size: int) -> bool:
    """The IV's 32-bit block counter does not wrap over ``size`` bytes (cryptography refuses a wrap)."""
    return int.from_bytes(iv[:4], "little") + (size + 63) // 64 <= 2**32


def seal(body: bytes, recipient: X25519PublicKey) -> dict[str, str]:
    """The sealed-body fields carrying ``body`` encrypted for ``recipient``."""
    eph = X25519PrivateKey.generate()
    secret = eph.exchange(recipient)
    while True:  # a salt whose derived counter would wrap inside the body (odds ~ blocks / 2**32): take another
        salt = os.urandom(8)
        key, iv = _key_iv(secret, salt)
        if _fits_counter(iv, len(body)):
            break
    ct = Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor().update(body)
    return {"sealed": SEAL_ALG, "recipient": image_fingerprint(recipient),
            "epk": base64.b64encode(_spki(eph.public_key())).decode(),
            "ct": base64.b64encode(b"Salted__" + salt + ct).decode()}


def unseal(fields: dict[str, Any], key: X25519PrivateKey) -> bytes:
    """The body inside sealed ``fields`` (whose signature was checked); a clear error for another key."""
    if fields.get("sealed") != SEAL_ALG:
        raise EnvelopeError(f"unknown envelope encryption {fields.get('sealed')!r} (this factory uses {SEAL_ALG})")
    mine = image_fingerprint(key)
    if fields.get("recipient") != mine:
        raise EnvelopeError(f"the envelope is encrypted for the image key sha256:{fields.get('recipient')}, "
                            f"not for this key sha256:{mine}")
    try:
        epk = base64.b64decode(fields["epk"], validate=True)
        blob = base64.b64decode(fields["ct"], validate=True)
    except (KeyError, binascii.Error):
        raise EnvelopeError("sealed envelope lacks its ephemeral key or ciphertext") from None
    if len(epk) != 44 or not epk.startswith(_X25519_SPKI) or blob[:8] != b"Salted__":
        raise EnvelopeError("sealed envelope's ephemeral key or ciphertext is malformed")
    k, iv = _key_iv(key.exchange(X25519PublicKey.from_public_bytes(epk[12:])), blob[8:16])
    if not _fits_counter(iv, len(blob) - 16):
        raise EnvelopeError("sealed envelope's block counter would wrap (this factory never makes one)")
    return Cipher(algorithms.ChaCha20(k, iv), mode=None).decryptor().update(blob[16:])


# -- envelope ---------------------------------------------------------------
def build(middleware: str, payload: Mapping[str, Any], key: Ed25519PrivateKey,
          seal_to: X25519PublicKey | None = None, clear: Mapping[str, Any] | None = None) -> str:
    """The signed UserData text for ``middleware``; raises UserDataTooLarge past its limit.

    With ``seal_to`` the body is encrypted for that image key and ``clear``
    (e.g. a log-only token) is signed alongside it in the clear. The signed
    body names ``key``'s id, whatever ``payload`` says.
    """
    signer = {"key_id": key_id(key)}
    body = encode_body({"v": VERSION, **payload, **signer})
    header = f"{HEADER} v{VERSION}"
    if seal_to is not None:
        kept = {k: payload[k] for k in CLEAR_FIELDS if k in payload}
        body = encode_body({"v": VERSION, **kept, **(clear or {}), **seal(body, seal_to), **signer})
        header += f" {SEALED}"
    sig = key.sign(body)
    text = f"{header}\n{base64.b64encode(body).decode()}\n{base64.b64encode(sig).decode()}\n"
    limit = middlewares.get(middleware).userdata_max_bytes  # raw bytes, before the transport's encoding
    size = len(text.encode())
    if size > limit:
        sealed = (" (encrypted: the body is base64-encoded twice, about 16/9 of it plus 450 bytes)"
                  if seal_to is not None else "")
        raise UserDataTooLarge(
            f"UserData envelope is {size} bytes{sealed}, over the {middleware} limit of {limit} bytes "
            f"(largest fields: {', '.join(sorted(payload, key=lambda k: -len(str(payload[k])))[:3])})"
        )
    return text


def is_sealed(text: str) -> bool:
    return text.lstrip().split("\n", 1)[0].strip() == f"{HEADER} v{VERSION} {SEALED}"


def split(text: str) -> tuple[bytes, bytes]:
    """The signed body and signature bytes of an envelope (unverified; still sealed if it is)."""
    lines = text.strip().splitlines()
    heads = (f"{HEADER} v{VERSION}", f"{HEADER} v{VERSION} {SEALED}")
    if len(lines) != 3 or lines[0].strip() not in heads:
        raise EnvelopeError(f"not a glidein UserData envelope (want 3 lines starting with '{HEADER} v{VERSION}')")
    try:
        return base64.b64decode(lines[1], validate=True), base64.b64decode(lines[2], validate=True)
    except binascii.Error:
        raise EnvelopeError("envelope body or signature is not base64") from None


def signer_id(body: bytes) -> str | None:
    """The key id a (not yet verified) body names, if it names a well-formed one."""
    found = _KEY_ID_LINE.search(body)
    return found.group(1).decode() if found else None


def parse(text: str, public_key: Ed25519PublicKey | None = None,
          image_key: X25519PrivateKey | None = None) -> dict[str, Any]:
    """The envelope's fields; with ``public_key``, only if the signature verifies.

    A sealed envelope is opened with ``image_key`` (after the signature
    check); without it, only its clear fields are returned.
    """
    body, sig = split(text)
    if public_key is not None:
        named, ours = signer_id(body), key_id(public_key)
        if named is not None and named != ours:
            raise EnvelopeError(f"the envelope is signed with factory key id {named}, not with key id {ours}")
        try:
            public_key.verify(sig, body)
        except InvalidSignature:
            raise EnvelopeError("envelope signature does not verify with the factory's public key") from None
    fields = decode_body(body)
    if not is_sealed(text) or image_key is None:
        return fields
    try:
        return decode_body(unseal(fields, image_key))
    except UnicodeDecodeError:
        raise EnvelopeError("the sealed envelope did not decrypt to an envelope body") from None
