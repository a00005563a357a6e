#!/usr/bin/env python3
"""Ed25519 signature check (RFC 8032, section 5.1.7) with the standard library only.

For VM images that have python3 but no openssl 1.1.1+. Usage:
    ed25519_verify.py PUBKEY.pem MESSAGE_FILE SIGNATURE_FILE
        exit 0 and "Signature Verified Successfully" if it verifies, 1 otherwise
    ed25519_verify.py keyid PUBKEY.pem
        the key id an envelope names its signing key by: the first 16 hex digits of
        SHA-256 over the raw 32-byte public key
Verification needs no secret, so plain (not constant-time) arithmetic is fine.
"""

import base64
import hashlib
import sys

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the group order
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SubjectPublicKeyInfo of an Ed25519 key


def _x_from_y(y, sign):
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if (x & 1) != sign else x


def _point(data):
    """Decode a 32-byte point into extended coordinates (X, Y, Z, T), or None."""
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _x_from_y(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


def _add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    e, h = (y1 - x1) * (y2 - x2) % P, (y1 + x1) * (y2 + x2) % P
    c, d = 2 * t1 * t2 * D % P, 2 * z1 * z2 % P
    e, f, g, h = h - e, d - c, d + c, h + e
    return e * f % P, g * h % P, f * g % P, e * h % P


def _mul(k, pt):
    acc = (0, 1, 1, 0)
    while k:
        if k & 1:
            acc = _add(acc, pt)
        pt = _add(pt, pt)
        k >>= 1
    return acc


def _same(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


_GY = 4 * pow(5, P - 2, P) % P
BASE = (_x_from_y(_GY, 0), _GY, 1, _x_from_y(_GY, 0) * _GY % P)


def verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = _point(public), _point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % L
    return _same(_mul(s, BASE), _add(r, _mul(h, a)))


def public_from_pem(text):
    """The raw key inside the PEM block (text around it is ignored, as openssl does)."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        body = "".join(lines[lines.index("-----BEGIN PUBLIC KEY-----") + 1:lines.index("-----END PUBLIC KEY-----")])
        der = base64.b64decode(body, validate=True)
    except ValueError:  # no PEM block, or not base64 inside it
        der = b""
    if len(der) != 44 or not der.startswith(SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key in PEM")
    return der[12:]


def key_id(public):
    return hashlib.sha256(public).hexdigest()[:16]


def read_public(path):
    with open(path) as f:
        return public_from_pem(f.read())


def main(argv):
    try:
        if len(argv) == 3 and argv[1] == "keyid":
            print(key_id(read_public(argv[2])))
            return 0
        if len(argv) != 4:
            print(__doc__, file=sys.stderr)
            return 2
        return check(read_public(argv[1]), argv[2], argv[3])
    except (OSError, ValueError) as exc:
        print(f"ed25519_verify.py: {exc}", file=sys.stderr)
        return 1


def check(public, message_file, signature_file):
    with open(message_file, "rb") as f:
        message = f.read()
    with open(signature_file, "rb") as f:
        signature = f.read()
    if verify(public, message, signature):
        print("Signature Verified Successfully")
        return 0
    print("Signature Verification Failure", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
