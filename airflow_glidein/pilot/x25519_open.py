#!/usr/bin/env python3
"""Open a sealed glidein envelope with the standard library only (images with python3 but no openssl 1.1.1+).

It does what the wrapper's openssl path does: X25519 with the image key and
the envelope's ephemeral key (RFC 7748), then what ``openssl enc -d -chacha20
-pbkdf2 -iter 1 -md sha256 -pass file:F`` does with F = the hex of that shared
secret: PBKDF2-HMAC-SHA256 (one iteration, the 8-byte salt after "Salted__")
gives the ChaCha20 key and 16-byte IV (OpenSSL layout: 32-bit little-endian
block counter, carried into the next word, then the 12-byte nonce). Usage:

    x25519_open.py fingerprint KEY.pem                 SHA-256 of its public key (DER), as the envelope names it
    x25519_open.py open KEY.pem EPK.der CT.bin OUT     decrypt CT.bin into OUT (mode 600)

Python's integers are not constant-time; this runs once per boot, as root, on
a key only root can read.
"""

import base64
import hashlib
import os
import struct
import sys

P = 2**255 - 19
A24 = 121665
PKCS8_PREFIX = bytes.fromhex("302e020100300506032b656e04220420")  # PKCS#8 of an X25519 private key
SPKI_PREFIX = bytes.fromhex("302a300506032b656e032100")  # SubjectPublicKeyInfo of an X25519 public key


def x25519(k, u):
    """RFC 7748 section 5: the scalar ``k`` (32 bytes) times the u-coordinate ``u`` (32 bytes)."""
    k = bytearray(k)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    k = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (k >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + A24 * e) % P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


def _rotl(v, n):
    return ((v << n) & 0xFFFFFFFF) | (v >> (32 - n))


def _block(key_words, counter, nonce_words):
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *key_words, *counter, *nonce_words]
    x = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            x[d] = _rotl(x[d] ^ x[a], 16)
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            x[b] = _rotl(x[b] ^ x[c], 12)
            x[a] = (x[a] + x[b]) & 0xFFFFFFFF
            x[d] = _rotl(x[d] ^ x[a], 8)
            x[c] = (x[c] + x[d]) & 0xFFFFFFFF
            x[b] = _rotl(x[b] ^ x[c], 7)
    return struct.pack("<16I", *((x[i] + state[i]) & 0xFFFFFFFF for i in range(16)))


def chacha20(key, iv, data):
    """ChaCha20 as OpenSSL's EVP_chacha20 runs it (a 16-byte IV: counter word, then a 12-byte nonce)."""
    key_words = struct.unpack("<8I", key)
    ctr0, n1, n2, n3 = struct.unpack("<4I", iv)
    out = bytearray()
    for i in range(0, len(data), 64):
        block = ctr0 + i // 64
        counter = (block & 0xFFFFFFFF, (n1 + (block >> 32)) & 0xFFFFFFFF)  # OpenSSL carries into the next word
        ks = _block(key_words, counter, (n2, n3))
        out += bytes(a ^ b for a, b in zip(data[i:i + 64], ks))
    return bytes(out)


def _der(pem_text):
    return base64.b64decode("".join(line for line in pem_text.splitlines() if line and not line.startswith("-----")))


def private_from_pem(text):
    der = _der(text)
    if len(der) < 48 or not der.startswith(PKCS8_PREFIX):
        raise ValueError("not an X25519 private key in PEM (PKCS#8, as openssl genpkey -algorithm X25519 writes it)")
    return der[16:48]


def fingerprint(private):
    return hashlib.sha256(SPKI_PREFIX + x25519(private, (9).to_bytes(32, "little"))).hexdigest()


def open_sealed(private, epk_der, blob):
    if len(epk_der) != 44 or not epk_der.startswith(SPKI_PREFIX):
        raise ValueError("the envelope's ephemeral key is not an X25519 public key")
    if blob[:8] != b"Salted__":
        raise ValueError("the ciphertext lacks openssl's Salted__ header")
    secret = x25519(private, epk_der[12:])
    if secret == bytes(32):
        raise ValueError("the ephemeral key is a low-order point")
    km = hashlib.pbkdf2_hmac("sha256", secret.hex().encode(), blob[8:16], 1, 48)
    return chacha20(km[:32], km[32:], blob[16:])


def main(argv):
    try:
        if len(argv) == 3 and argv[1] == "fingerprint":
            with open(argv[2]) as f:
                print(fingerprint(private_from_pem(f.read())))
            return 0
        if len(argv) == 6 and argv[1] == "open":
            with open(argv[2]) as f:
                private = private_from_pem(f.read())
            with open(argv[3], "rb") as f:
                epk = f.read()
            with open(argv[4], "rb") as f:
                blob = f.read()
            body = open_sealed(private, epk, blob)
            fd = os.open(argv[5], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return 0
    except (OSError, ValueError) as exc:
        print(f"x25519_open: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
