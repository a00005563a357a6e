"""Sealed envelopes (pure): encrypt-then-sign round trip, tampering, wrong keys, size, the VM's python opener.

The wrapper's openssl path and python3 path run against the real service in
tests/test_wrapper_sealed.py; here the cipher itself is checked against
cryptography, RFC 7748's vectors and the openssl command line.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from airflow_glidein import userdata as U
from airflow_glidein.config import parse_config
from tests.helpers import example_config
from tests.pilot_helpers import PILOT
from tests.test_userdata import PAYLOAD

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command here")


def opener():
    spec = importlib.util.spec_from_file_location("x25519_open", PILOT / "x25519_open.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def private_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def sealed(payload=PAYLOAD, middleware="ec2"):
    sign, image = U.generate_key(), U.generate_image_key()
    text = U.build(middleware, payload, sign, seal_to=image.public_key(), clear={"log_token": "L" * 43})
    return text, sign, image


def with_outer(text: str, change) -> str:
    """The envelope with its signed outer body changed by ``change`` and the original signature kept."""
    head, body, sig = text.splitlines()
    fields = U.decode_body(base64.b64decode(body))
    change(fields)
    return "\n".join([head, base64.b64encode(U.encode_body(fields)).decode(), sig]) + "\n"


def test_round_trip_hides_the_token_and_keeps_url_and_log_token_clear():
    text, sign, image = sealed()
    assert text.startswith("#glidein-envelope v1 sealed\n") and U.is_sealed(text)
    assert U.parse(text, sign.public_key(), image) == {"v": 1, **PAYLOAD, "key_id": U.key_id(sign)}
    outer = U.parse(text, sign.public_key())  # without the image key: only what is in the clear
    assert outer["bootstrap_url"] == PAYLOAD["bootstrap_url"] and outer["log_token"] == "L" * 43
    assert outer["key_id"] == U.key_id(sign)  # the wrapper picks its key before anything is decrypted
    assert outer["recipient"] == U.image_fingerprint(image) and outer["sealed"] == U.SEAL_ALG
    assert "token" not in outer and "launch_id" not in outer
    decoded = base64.b64decode(text.splitlines()[1])
    for secret in (PAYLOAD["token"], PAYLOAD["launch_id"], PAYLOAD["script_sha256"]):
        assert secret not in text and secret.encode() not in decoded and secret not in str(outer)
    # one ephemeral key per envelope: the same payload never seals to the same bytes
    assert U.build("ec2", PAYLOAD, sign, seal_to=image.public_key()) != U.build("ec2", PAYLOAD, sign,
                                                                                seal_to=image.public_key())


@pytest.mark.parametrize("field", ["ct", "epk", "recipient", "log_token", "bootstrap_url"])
def test_any_change_to_the_signed_outer_body_fails_the_signature_before_decryption(field):
    text, sign, image = sealed()

    def flip(fields):
        raw = bytearray(fields[field].encode())
        raw[len(raw) // 2] ^= 1
        fields[field] = raw.decode()

    tampered = with_outer(text, flip)
    with pytest.raises(U.EnvelopeError, match="signature does not verify"):
        U.parse(tampered, sign.public_key(), image)
    # re-signed by someone else: still refused, naming the key it was signed with
    forged = U.build("ec2", PAYLOAD, U.generate_key(), seal_to=image.public_key())
    with pytest.raises(U.EnvelopeError, match=f"signed with factory key id [0-9a-f]{{16}}, not with key id "
                                              f"{U.key_id(sign)}"):
        U.parse(forged, sign.public_key(), image)


def test_another_image_key_is_named_and_nothing_is_decrypted():
    text, sign, image = sealed()
    other = U.generate_image_key()
    with pytest.raises(U.EnvelopeError, match=rf"encrypted for the image key sha256:{U.image_fingerprint(image)}, "
                                              rf"not for this key sha256:{U.image_fingerprint(other)}"):
        U.parse(text, sign.public_key(), other)


def test_encryption_overhead_counts_against_the_limit():
    sign, image = U.generate_key(), U.generate_image_key()
    # plain: base64 of the body; sealed: base64 of (clear fields + base64 of the body): ~16/9 of it
    payload = {**PAYLOAD, "factory": "f" * 10000}
    assert len(U.build("ec2", payload, sign)) < 16384
    with pytest.raises(U.UserDataTooLarge, match=r"bytes \(encrypted: .*over the ec2 limit of 16384 bytes.*factory"):
        U.build("ec2", payload, sign, seal_to=image.public_key())
    assert len(U.build("openstack", payload, sign, seal_to=image.public_key())) < 65535


def test_image_public_key_forms_and_a_pasted_private_key_is_refused_unechoed():
    image = U.generate_image_key()
    pub = image.public_key()
    pem = U.image_public_pem(image)
    der_b64 = "".join(pem.splitlines()[1:-1])
    raw_b64 = base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    for text in (pem, der_b64, raw_b64):
        assert U.image_fingerprint(U.image_public_from_text(text)) == U.image_fingerprint(image)
    secret = private_pem(image)
    with pytest.raises(U.EnvelopeError, match="this is a private key") as err:
        U.image_public_from_text(secret)
    assert secret.splitlines()[1] not in str(err.value)
    with pytest.raises(U.EnvelopeError, match="not an X25519 key"):
        U.image_public_from_text(U.public_pem(U.generate_key()))  # the Ed25519 signing key's public half
    with pytest.raises(U.EnvelopeError, match="neither PEM nor base64"):
        U.image_public_from_text("not-a-key!")


def test_entry_option_is_validated():
    image = U.generate_image_key()
    der_b64 = "".join(U.image_public_pem(image).splitlines()[1:-1])

    def entry_with(enc, middleware=None):
        data = example_config()
        data["entries"][0]["encrypt_userdata"] = enc
        if middleware:
            data["entries"][0]["middleware"] = middleware
        return parse_config(data)

    assert entry_with({"public_key": der_b64}).entry("aws-us-east-1").encrypt_userdata.public_key == der_b64
    assert entry_with({"conn_id": "glidein_image_key"}).entry("aws-us-east-1").encrypt_userdata.conn_id
    assert entry_with(None).entry("aws-us-east-1").encrypt_userdata is None
    from airflow_glidein.config import ConfigError

    for enc, message in (({}, "either inline"), ({"public_key": der_b64, "conn_id": "x"}, "not both"),
                         ({"public_key": private_pem(image)}, "this is a private key"),
                         ({"public_key": der_b64, "encrypt": True}, "encrypt: unknown field")):
        with pytest.raises(ConfigError, match=message) as err:
            entry_with(enc)
        assert private_pem(image).splitlines()[1] not in str(err.value)
    with pytest.raises(ConfigError, match="htcondor_g pilots run on worker nodes"):
        entry_with({"public_key": der_b64}, middleware="htcondor_g")


def test_vm_python_opener_agrees_with_cryptography_and_rfc7748():
    x = opener()
    # RFC 7748 section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert x.x25519(alice, (9).to_bytes(32, "little")).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert x.x25519(alice, bob_pub).hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    for _ in range(3):
        text, sign, image = sealed({**PAYLOAD, "factory": os.urandom(200).hex()})
        outer = U.parse(text, sign.public_key())
        private = x.private_from_pem(private_pem(image))
        assert x.fingerprint(private) == outer["recipient"]
        body = x.open_sealed(private, base64.b64decode(outer["epk"]), base64.b64decode(outer["ct"]))
        assert U.decode_body(body) == U.parse(text, sign.public_key(), image)
    with pytest.raises(ValueError, match="low-order"):
        x.open_sealed(private, x.SPKI_PREFIX + bytes(32), base64.b64decode(outer["ct"]))


def test_counter_that_would_wrap_is_never_made():
    assert U._fits_counter(b"\x00" * 16, 64 * 1000)
    assert not U._fits_counter(b"\xff\xff\xff\xff" + b"\x00" * 12, 65)
    assert U._fits_counter(b"\xff\xff\xff\xff" + b"\x00" * 12, 64)


@needs_openssl
def test_vm_chacha20_matches_openssl_enc_including_the_counter_carry():
    x = opener()
    for ctr in (b"\x00\x00\x00\x00", b"\xfe\xff\xff\xff"):  # the second crosses the 32-bit block counter
        key, iv, data = os.urandom(32), ctr + os.urandom(12), os.urandom(300)
        out = subprocess.run(["openssl", "enc", "-chacha20", "-K", key.hex(), "-iv", iv.hex()], input=data,
                             capture_output=True, check=True).stdout
        assert x.chacha20(key, iv, data) == out


@needs_openssl
def test_openssl_command_line_opens_what_the_factory_seals(tmp_path):
    """The wrapper's openssl steps, by hand: derive, hex the secret into a file, openssl enc -d."""
    text, sign, image = sealed()
    outer = U.parse(text, sign.public_key())
    (tmp_path / "k.pem").write_text(private_pem(image))
    (tmp_path / "epk.der").write_bytes(base64.b64decode(outer["epk"]))
    (tmp_path / "ct.bin").write_bytes(base64.b64decode(outer["ct"]))
    run = lambda *a: subprocess.run(a, cwd=tmp_path, capture_output=True, check=True).stdout  # noqa: E731
    run("openssl", "pkeyutl", "-derive", "-inkey", "k.pem", "-peerkey", "epk.der", "-peerform", "DER", "-out", "ss")
    (tmp_path / "pass").write_text((tmp_path / "ss").read_bytes().hex() + "\n")
    body = run("openssl", "enc", "-d", "-chacha20", "-pbkdf2", "-iter", "1", "-md", "sha256", "-pass", "file:pass",
               "-in", "ct.bin")
    assert U.decode_body(body) == {"v": 1, **PAYLOAD, "key_id": U.key_id(sign)}
