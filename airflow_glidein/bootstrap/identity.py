"""What a pilot can prove about the instance id it claims, per middleware.

EC2 signs each instance's identity document (IMDS
``/latest/dynamic/instance-identity/document``, with its RSA-SHA256
``signature`` beside it, verified with the certificate AWS publishes for the
region). When an EC2 entry has a certificate (``identity_cert`` in its
options, else ``[glidein] ec2_identity_cert``: a PEM file or the PEM text),
its pilots must send the document and its signature with the exchange, and
the document's instanceId (and region, when the entry names one) must be the
instance claimed: a token read from UserData is then useless on another
machine. The same holds for the VMs HTCondor-G's EC2 GAHP starts (an
``htcondor_g`` entry whose grid_resource is ``ec2 URL``): such a VM claims its
instance id, the alias of its grid job. Elsewhere (OpenStack, OpenNebula,
grid jobs on worker nodes, EC2 without a certificate) nothing a pilot can
send proves its id: the first exchange binds it, a second claim of a bound id
is refused and reported.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from airflow_glidein.bootstrap.guard import setting
from airflow_glidein.config import Entry

MAX_BODY = 16 * 1024  # an exchange body: the identity document (~0.5 KB) and its signature


class IdentityRefused(Exception):
    pass


class CertificateUnusable(Exception):
    """The configured certificate cannot be read: the service's fault, not the pilot's."""


def certificate_source(entry: Entry) -> str | None:
    """The PEM (file or text) an EC2 entry's identity documents are checked with, or None."""
    ec2_grid = entry.middleware == "htcondor_g" and str(entry.options.get("grid_resource", "")).startswith("ec2 ")
    if entry.middleware != "ec2" and not ec2_grid:
        return None
    return entry.options.get("identity_cert") or setting("ec2_identity_cert", "") or None


@lru_cache(maxsize=16)
def _certificate(source: str, stamp: float) -> x509.Certificate:
    text = source if source.lstrip().startswith("-----BEGIN") else open(source).read()
    return x509.load_pem_x509_certificate(text.encode())


def certificate(source: str) -> x509.Certificate:
    stamp = 0.0 if source.lstrip().startswith("-----BEGIN") else os.stat(source).st_mtime
    return _certificate(source, stamp)


def parse_body(body: bytes) -> dict[str, str]:
    """An exchange body: ``key=value`` lines (what the wrapper writes); unknown keys are ignored."""
    out = {}
    for line in body.decode("ascii", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("identity_document", "identity_signature"):
            out[key] = value.strip()
    return out


def verify_ec2(entry: Entry, claimed: str, fields: dict[str, str]) -> dict[str, Any] | None:
    """The verified identity document (None when the entry has no certificate: nothing to check)."""
    source = certificate_source(entry)
    if source is None:
        return None
    if not fields.get("identity_document") or not fields.get("identity_signature"):
        raise IdentityRefused(f"entry {entry.name} requires the EC2 instance identity document and its signature "
                              "(IMDSv2) with the exchange")
    try:
        doc = base64.b64decode(fields["identity_document"], validate=True)
        sig = base64.b64decode("".join(fields["identity_signature"].split()), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityRefused("the identity document or its signature is not base64") from None
    try:
        key = certificate(source).public_key()
    except (OSError, ValueError) as exc:
        raise CertificateUnusable(f"entry {entry.name}: its EC2 identity certificate cannot be read "
                                  f"({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateUnusable(f"entry {entry.name}: its EC2 identity certificate holds no RSA key")
    try:
        key.verify(sig, doc, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise IdentityRefused("the instance identity document's signature does not verify with the entry's "
                              "certificate") from None
    try:
        parsed = json.loads(doc)
    except ValueError:
        raise IdentityRefused("the signed identity document is not JSON") from None
    if not isinstance(parsed, dict) or parsed.get("instanceId") != claimed:
        raise IdentityRefused("the signed identity document is of another instance")
    if entry.region and parsed.get("region") != entry.region:
        raise IdentityRefused(f"the signed identity document is of another region than entry {entry.name}'s")
    return parsed
