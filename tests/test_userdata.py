"""The UserData envelope (pure): signing, parsing, size limits per middleware, and the VM's python verifier."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest

from airflow_glidein import userdata as U
from tests.pilot_helpers import PILOT

PAYLOAD = {"launch_id": "abc.cms.aws-us-east-1.0", "entry": "aws-us-east-1", "frontend": "cms", "factory": "f",
           "bootstrap_url": "https://airflow.example.org/glidein", "token": "t" * 43, "token_expires": 1700000900,
           "script_sha256": "0" * 64, "idle_timeout": 1200, "max_lifetime": 86400}


def verifier():
    spec = importlib.util.spec_from_file_location("ed25519_verify", PILOT / "ed25519_verify.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_trip_is_signed_small_and_typed():
    key = U.generate_key()
    text = U.build("ec2", PAYLOAD, key)
    assert text.startswith("#glidein-envelope v1\n") and len(text) < 1024
    got = U.parse(text, key.public_key())
    assert got == {"v": 1, **PAYLOAD, "key_id": U.key_id(key)}
    assert isinstance(got["token_expires"], int)


def test_a_changed_body_or_another_key_does_not_verify():
    key = U.generate_key()
    head, body, sig = U.build("ec2", PAYLOAD, key).splitlines()
    forged = base64.b64decode(body).replace(b"frontend=cms", b"frontend=cmx")
    tampered = "\n".join([head, base64.b64encode(forged).decode(), sig])
    with pytest.raises(U.EnvelopeError, match="signature does not verify"):
        U.parse(tampered, key.public_key())
    with pytest.raises(U.EnvelopeError, match="signed with factory key id [0-9a-f]{16}, not with key id"):
        U.parse(U.build("ec2", PAYLOAD, U.generate_key()), key.public_key())
    # another key's signature over a body that names our key id
    forged = U.encode_body({"v": 1, **PAYLOAD, "key_id": U.key_id(key)})
    text = "\n".join([head, base64.b64encode(forged).decode(),
                      base64.b64encode(U.generate_key().sign(forged)).decode()])
    with pytest.raises(U.EnvelopeError, match="signature does not verify"):
        U.parse(text, key.public_key())


@pytest.mark.parametrize("middleware,limit", [("ec2", 16384), ("openstack", 65535), ("opennebula", 65535)])
def test_each_middleware_limit_is_a_clear_error(middleware, limit):
    key = U.generate_key()
    # base64 grows the body by 4/3: find a URL length that lands just under and just over the limit
    fits = {**PAYLOAD, "bootstrap_url": "https://x/" + "a" * (limit * 3 // 4 - 600)}
    assert len(U.build(middleware, fits, key)) <= limit
    too_big = {**PAYLOAD, "bootstrap_url": "https://x/" + "a" * (limit * 3 // 4)}
    with pytest.raises(U.UserDataTooLarge, match=rf"over the {middleware} limit of {limit} bytes.*bootstrap_url"):
        U.build(middleware, too_big, key)


def test_fields_that_would_break_the_line_format_are_refused():
    key = U.generate_key()
    with pytest.raises(U.EnvelopeError, match="control character"):
        U.build("ec2", {**PAYLOAD, "entry": "a\nmalicious=1"}, key)
    with pytest.raises(U.EnvelopeError, match="field name"):
        U.build("ec2", {**PAYLOAD, "Bad-Key": "x"}, key)
    with pytest.raises(U.EnvelopeError, match="not a glidein UserData envelope"):
        U.parse("#!/bin/bash\necho hi\n")


def test_signing_key_from_pem_or_seed_and_bad_keys_named():
    key = U.generate_key()
    pem = U.private_pem(key)
    seed = base64.b64encode(key.private_bytes_raw()).decode()
    for text in (pem, seed):
        assert U.public_pem(U.private_key_from_text(text)) == U.public_pem(key)
    with pytest.raises(U.EnvelopeError, match="neither an Ed25519 PEM"):
        U.private_key_from_text("not a key")
    assert U.fingerprint(U.public_pem(key)) != U.fingerprint(U.public_pem(U.generate_key()))


def test_vm_python_verifier_agrees_with_cryptography():
    v = verifier()
    # RFC 8032 section 7.1, test 1
    pub = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert v.verify(pub, b"", sig)
    assert not v.verify(pub, b"x", sig)
    for _ in range(5):
        key = U.generate_key()
        msg = os.urandom(300)
        good = key.sign(msg)
        pub = v.public_from_pem(U.public_pem(key))
        assert v.verify(pub, msg, good)
        bad = bytearray(good)
        bad[7] ^= 4
        assert not v.verify(pub, msg, bytes(bad))


def test_the_envelope_names_its_signing_key_and_a_payload_cannot_override_it():
    key, other = U.generate_key(), U.generate_key()
    kid = U.key_id(key)
    assert len(kid) == 16 and kid == hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()[:16]
    text = U.build("ec2", {**PAYLOAD, "key_id": U.key_id(other)}, key)
    assert U.parse(text)["key_id"] == kid
    with pytest.raises(U.EnvelopeError) as exc:
        U.parse(text, other.public_key())
    assert str(exc.value) == f"the envelope is signed with factory key id {kid}, not with key id {U.key_id(other)}"


def test_vm_python_verifier_computes_the_key_id_and_reads_only_the_pem_block(tmp_path):
    v = verifier()
    key = U.generate_key()
    pub = tmp_path / "factory.pub"
    # text around the PEM block (a log line a redirect caught) is ignored, as openssl ignores it
    pub.write_text("2026-01-01T00:00:00Z [warning] something\n" + U.public_pem(key) + "# trailing note\n")
    assert v.key_id(v.read_public(str(pub))) == U.key_id(key)
    out = subprocess.run([sys.executable, str(PILOT / "ed25519_verify.py"), "keyid", str(pub)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == U.key_id(key) + "\n"
    pub.write_text("not a key\n")
    bad = subprocess.run([sys.executable, str(PILOT / "ed25519_verify.py"), "keyid", str(pub)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == "" and "not an Ed25519 public key in PEM" in bad.stderr
    assert "Traceback" not in bad.stderr
