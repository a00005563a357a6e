"""Stand-in for the metadata services a cloud VM reads its UserData from, on 127.0.0.1.

Modes: ``imdsv2`` (EC2 with HttpTokens=required: PUT /latest/api/token, then
GETs with the X-aws-ec2-metadata-token header; a GET without it is 401),
``imdsv1`` (EC2-compatible API without the token endpoint: the PUT is 404),
``openstack`` (Nova's metadata service: /openstack/latest/user_data and
meta_data.json; no EC2 paths). Requests are recorded so a test can say which
path the wrapper took. No test ever reaches 169.254.169.254.

The EC2 modes also serve the signed instance identity document
(/latest/dynamic/instance-identity/document, and its base64 RSA-SHA256
``signature`` as AWS publishes it), signed with the stand-in's own RSA key;
``identity_cert_pem`` is the certificate that verifies it (AWS's regional
certificate in real life). ``identity`` overrides document fields (a
document of another instance or region).
"""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


@lru_cache(maxsize=1)
def identity_key() -> tuple[rsa.RSAPrivateKey, str]:
    """The stand-in's signing key and its self-signed certificate (PEM); one per test session (RSA is slow to make)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Metadata stand-in"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "instance identity")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


def identity_document(instance_id: str, **fields) -> bytes:
    """An instance identity document as EC2 lays it out."""
    doc = {"accountId": "123456789012", "architecture": "x86_64", "availabilityZone": "us-east-1a",
           "billingProducts": None, "devpayProductCodes": None, "marketplaceProductCodes": None,
           "imageId": "ami-1e749f67", "instanceId": instance_id, "instanceType": "c5.xlarge", "kernelId": None,
           "pendingTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "privateIp": "10.0.0.5",
           "ramdiskId": None, "region": "us-east-1", "version": "2017-09-30", **fields}
    return json.dumps(doc, indent=2, separators=(",", " : ")).encode()


def identity_signature(document: bytes, key: rsa.RSAPrivateKey | None = None) -> bytes:
    """The base64 RSA-SHA256 signature of ``document``, in 64-column lines (IMDS .../signature)."""
    sig = (key or identity_key()[0]).sign(document, padding.PKCS1v15(), hashes.SHA256())
    return "\n".join(textwrap.wrap(base64.b64encode(sig).decode(), 64)).encode()


class MetadataServer:
    def __init__(self, mode: str, userdata: bytes, instance_id: str, identity: dict | None = None) -> None:
        assert mode in ("imdsv2", "imdsv1", "openstack")
        self.mode, self.userdata, self.instance_id = mode, userdata, instance_id
        self.identity_document = identity_document(instance_id, **(identity or {}))
        self.identity_cert_pem = identity_key()[1]
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had a session token)
        self.tokens: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path, False))
                if outer.mode == "imdsv2" and self.path == "/latest/api/token" \
                        and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    token = secrets.token_urlsafe(16)
                    outer.tokens.add(token)
                    return self._send(200, token.encode())
                self._send(404)

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token")
                outer.requests.append(("GET", self.path, token in outer.tokens))
                ec2 = {"/latest/user-data": outer.userdata,
                       "/latest/meta-data/instance-id": outer.instance_id.encode(),
                       "/latest/dynamic/instance-identity/document": outer.identity_document,
                       "/latest/dynamic/instance-identity/signature": identity_signature(outer.identity_document)}
                nova = {"/openstack/latest/user_data": outer.userdata,
                        "/openstack/latest/meta_data.json": json.dumps(
                            {"uuid": outer.instance_id, "name": "glidein", "availability_zone": "nova"}).encode()}
                if outer.mode == "openstack":
                    return self._send(200, nova[self.path]) if self.path in nova else self._send(404)
                if self.path not in ec2:
                    return self._send(404)
                if outer.mode == "imdsv2" and token not in outer.tokens:
                    return self._send(401)
                self._send(200, ec2[self.path])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MetadataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
