"""Real credential material for tests, made with cryptography: a CA, user certificates, RFC 3820 proxies, SSH keys.

EC keys keep generation fast; the readers treat every key type alike.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID, ObjectIdentifier

PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.5.5.7.1.14")  # RFC 3820 proxyCertInfo
NOW = datetime.now(timezone.utc)


def _name(*cns: str, org: str = "Glidein Test") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]
    return x509.Name(attrs)


def _cert(subject, issuer, key, signer, start, end, ca=False, proxy=False) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if proxy:
        # id-ppl-inheritAll, DER: SEQUENCE { SEQUENCE { OID 1.3.6.1.5.5.7.21.1 } }
        b = b.add_extension(x509.UnrecognizedExtension(PROXY_CERT_INFO, bytes.fromhex("300c300a06082b06010505071501")),
                            critical=True)
    return b.sign(signer, hashes.SHA256())


def _pem(obj) -> str:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM).decode()
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class CA:
    def __init__(self, name: str = "Test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = _cert(self.name, self.name, self.key, self.key, NOW - timedelta(days=1), NOW + timedelta(days=3650),
                          ca=True)

    def user(self, cn: str, hours: float = 24 * 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name(cn), self.name, key, self.key, NOW - timedelta(days=1), NOW + timedelta(hours=hours))
        return cert, key

    def proxy(self, cn: str = "Pilot User", hours: float = 48, user_hours: float = 24 * 365,
              start_hours: float = -0.1, passphrase: bytes | None = None) -> str:
        """A proxy file: proxy certificate, its key, then the user certificate (the chain)."""
        user, user_key = self.user(cn, user_hours)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(cn, str(x509.random_serial_number() % 10**9))
        start = NOW + timedelta(hours=min(start_hours, hours - 12))
        cert = _cert(subject, user.subject, key, user_key, start, NOW + timedelta(hours=hours), proxy=True)
        if passphrase:
            enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(passphrase)).decode()
            return _pem(cert) + enc + _pem(user)
        return _pem(cert) + _pem(key) + _pem(user)


def subject_of(pem: str) -> str:
    return x509.load_pem_x509_certificates(pem.encode())[0].subject.rfc4514_string()


def private_key_pem(pem: str) -> str:
    start = pem.index("-----BEGIN PRIVATE KEY-----")
    end = pem.index("-----END PRIVATE KEY-----") + len("-----END PRIVATE KEY-----")
    return pem[start:end]


def ssh_private_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


def hours(h: float) -> int:
    return int((NOW + timedelta(hours=h)).timestamp())


def conn(conn_type: str, **fields) -> str:
    """An AIRFLOW_CONN_<ID> value (JSON)."""
    return json.dumps({"conn_type": conn_type, **fields})
