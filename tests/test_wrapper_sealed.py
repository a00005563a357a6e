"""Entries with encrypt_userdata: the real wrapper opens sealed envelopes, against the real service and moto.

The factory seals each launch's envelope for the image's X25519 key (from
the config, or from an Airflow connection); the VM holds the private key
(a mode-600 file here, /etc/glidein/userdata.key in an image). Decryption
runs with openssl or with the wrapper's python3 fallback; a missing or wrong
key, or an altered envelope, stops the wrapper with a clear message.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import keys
from airflow_glidein.state import store
from tests.helpers import example_config, write_config
from tests.pilot_helpers import VM, launch, userdata_of
from tests.standins.metadata import MetadataServer
from tests.test_userdata_sealed import private_pem, with_outer
from tests.test_wrapper_paths import booted_ok

pytestmark = pytest.mark.usefixtures("airflow_db")
ENTRY = "aws-us-east-1"


@pytest.fixture
def image_key():
    return U.generate_image_key()


def sealed_config(tmp_path, monkeypatch, server, encrypt: dict) -> dict:
    """pilot_config with aws-us-east-1's encrypt_userdata set to ``encrypt``."""
    cfg = example_config()
    cfg["factory"].update({"retry_delay": 0, "bootstrap_url": f"{server.url}/glidein",
                           "collector": "cm.example.org:9618"})
    next(e for e in cfg["entries"] if e["name"] == ENTRY)["encrypt_userdata"] = encrypt
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


@pytest.fixture
def cfg(ec2, bootstrap_server, tmp_path, monkeypatch, image_key):
    """The example config with aws-us-east-1 sealed for ``image_key`` (its public key inline, base64 DER)."""
    der_b64 = "".join(U.image_public_pem(image_key).splitlines()[1:-1])
    return sealed_config(tmp_path, monkeypatch, bootstrap_server, {"public_key": der_b64})


def vm_with_key(root, server, key, **env) -> VM:
    vm = VM(root, server, dict(env))
    path = root / "userdata.key"
    path.write_text(private_pem(key))
    path.chmod(0o600)
    vm.env["GLIDEIN_USERDATA_KEY"] = str(path)
    return vm


def the_token(text: str, image_key) -> str:
    return U.parse(text, keys.signing_key(store()).public_key(), image_key)["token"]


def test_imdsv2_with_openssl_and_no_token_in_the_userdata(cfg, ec2, bootstrap_server, tmp_path, image_key):
    (iid,), text = launch(cfg)
    raw = userdata_of(ec2, iid)  # what anyone with the provider's API (or IMDS on the VM) reads
    assert raw.decode() == text and raw.startswith(b"#glidein-envelope v1 sealed\n")
    token = the_token(text, image_key)
    inner = U.parse(text, keys.signing_key(store()).public_key(), image_key)
    outer = U.parse(text)
    decoded = base64.b64decode(raw.splitlines()[1])
    for secret in (token, inner["launch_id"], inner["script_sha256"]):
        assert secret.encode() not in raw and secret.encode() not in decoded and secret not in outer.values()
    with MetadataServer("imdsv2", raw, iid) as md:
        vm = vm_with_key(tmp_path / "vm", bootstrap_server, image_key, GLIDEIN_IMDS_URL=md.url,
                         GLIDEIN_VERIFIER="openssl")
        proc = vm.boot()
    logs = booted_ok(vm, proc, iid, bootstrap_server)
    log = logs["glidein.log"]
    assert "UserData from imdsv2" in log and "signature verified with openssl (OpenSSL" in log
    assert "envelope decrypted with openssl (OpenSSL" in log and U.image_fingerprint(image_key) in log
    assert log.index("signature verified") < log.index("envelope decrypted")  # encrypt-then-sign: verify first
    assert "world-readable" not in log
    assert not (vm.work / "ecdh.pass").exists() and not (vm.work / "ecdh.bin").exists()
    assert token not in log and token not in proc.stderr


def test_opennebula_context_with_the_python3_fallback(cfg, ec2, bootstrap_server, tmp_path, image_key):
    (iid,), _ = launch(cfg)
    vm = vm_with_key(tmp_path / "vm", bootstrap_server, image_key, GLIDEIN_VERIFIER="python3")
    vm.one_context(userdata_of(ec2, iid), iid)
    logs = booted_ok(vm, vm.boot(), iid, bootstrap_server)
    log = logs["glidein.log"]
    assert "UserData from opennebula" in log and "signature verified with python3" in log
    assert "envelope decrypted with python3" in log


def test_config_drive_with_the_key_from_a_connection(ec2, bootstrap_server, tmp_path, monkeypatch, image_key):
    """The public key in an Airflow connection; openssl verifies, the python3 fallback decrypts."""
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_IMAGE_KEY",
                       json.dumps({"conn_type": "generic", "password": U.image_public_pem(image_key)}))
    cfg = sealed_config(tmp_path, monkeypatch, bootstrap_server, {"conn_id": "glidein_image_key"})
    (iid,), text = launch(cfg)
    assert U.is_sealed(text)
    vm = vm_with_key(tmp_path / "vm", bootstrap_server, image_key, GLIDEIN_VERIFIER="openssl",
                     GLIDEIN_DECRYPTER="python3")
    vm.config_drive(userdata_of(ec2, iid), iid)
    logs = booted_ok(vm, vm.boot(), iid, bootstrap_server)
    assert "signature verified with openssl" in logs["glidein.log"]
    assert "envelope decrypted with python3" in logs["glidein.log"]


def test_a_missing_key_connection_fails_the_launch_before_registering(ec2, bootstrap_server, tmp_path, monkeypatch):
    cfg = sealed_config(tmp_path, monkeypatch, bootstrap_server, {"conn_id": "glidein_no_such_key"})
    with pytest.raises(U.EnvelopeError, match=f"entry {ENTRY}: no Airflow connection glidein_no_such_key"):
        launch(cfg)


@pytest.mark.parametrize("tool", ["openssl", "python3"])
def test_wrong_image_key_stops_the_wrapper_and_its_log_comes_home(cfg, ec2, bootstrap_server, tmp_path, image_key,
                                                                  tool):
    (iid,), text = launch(cfg)
    other = U.generate_image_key()
    vm = vm_with_key(tmp_path / "vm", bootstrap_server, other, GLIDEIN_VERIFIER=tool)
    vm.env["GLIDEIN_USERDATA_KEY"] = str(tmp_path / "vm" / "userdata.key")
    (tmp_path / "vm" / "userdata.key").chmod(0o644)
    proc = vm.boot(str(_envelope(tmp_path, userdata_of(ec2, iid))), iid)
    assert proc.returncode == 1
    want, got = U.image_fingerprint(image_key), U.image_fingerprint(other)
    assert (f"the envelope is encrypted for the image key sha256:{want}, but {vm.env['GLIDEIN_USERDATA_KEY']} "
            f"is sha256:{got}") in proc.stderr
    assert "this image was baked with another key" in proc.stderr and f"checked with {tool}" in proc.stderr
    assert "is world-readable" in proc.stderr  # the key file was left mode 644
    assert not (vm.work / "glidein-startup.sh").exists() and not (vm.work / "condor").exists() and vm.powered_off
    # the clear log-only token brought the log home ...
    logs = bootstrap_server.logs(ENTRY, iid)
    assert "this image was baked with another key" in logs["glidein.log"]
    # ... and cannot do more: no exchange with it; the real token was never used and still works
    log_token = U.parse(text)["log_token"]
    refused = httpx.post(f"{bootstrap_server.url}/glidein/bootstrap/exchange", params={"instance_id": iid},
                         headers={"Authorization": f"Bearer {log_token}"})
    assert refused.status_code == 403 and "unknown bootstrap token" in refused.text
    ok = httpx.post(f"{bootstrap_server.url}/glidein/bootstrap/exchange", params={"instance_id": iid},
                    headers={"Authorization": f"Bearer {the_token(text, image_key)}"})
    assert ok.status_code == 200
    # once the pilot has exchanged, its logs take its upload token only
    late = httpx.put(f"{bootstrap_server.url}/glidein/bootstrap/logs/glidein.log", params={"instance_id": iid},
                     content=b"overwritten", headers={"Authorization": f"Bearer {log_token}"})
    assert late.status_code == 403 and "its logs need its upload token" in late.text
    assert "overwritten" not in bootstrap_server.logs(ENTRY, iid)["glidein.log"]


def _envelope(tmp_path, data: bytes):
    path = tmp_path / "envelope"
    path.write_bytes(data)
    return path


def test_an_image_without_the_key_says_so(cfg, ec2, bootstrap_server, tmp_path, image_key):
    (iid,), _ = launch(cfg)
    vm = VM(tmp_path / "vm", bootstrap_server)
    vm.env["GLIDEIN_USERDATA_KEY"] = str(tmp_path / "no-such.key")
    proc = vm.boot(str(_envelope(tmp_path, userdata_of(ec2, iid))), iid)
    assert proc.returncode == 1
    assert (f"the envelope is encrypted for the image key sha256:{U.image_fingerprint(image_key)}, but this image "
            f"has no private key at {tmp_path / 'no-such.key'}") in proc.stderr
    assert "glidein.log" in bootstrap_server.logs(ENTRY, iid) and vm.powered_off


@pytest.mark.parametrize("field", ["ct", "epk"])
def test_an_altered_sealed_envelope_stops_before_any_decryption(cfg, ec2, bootstrap_server, tmp_path, image_key,
                                                               field):
    (iid,), text = launch(cfg)

    def alter(fields):
        blob = bytearray(base64.b64decode(fields[field]))
        blob[-1] ^= 1
        fields[field] = base64.b64encode(bytes(blob)).decode()

    vm = vm_with_key(tmp_path / "vm", bootstrap_server, image_key)
    proc = vm.boot(str(_envelope(tmp_path, with_outer(text, alter).encode())), iid)
    assert proc.returncode == 1
    assert "envelope signature does not verify with the factory key" in proc.stderr
    assert "decrypt" not in proc.stderr
    assert not (vm.work / "ct.bin").exists() and not (vm.work / "epk.der").exists() and vm.powered_off
    assert bootstrap_server.logs(ENTRY, iid) == {}  # nothing untrusted is contacted


def test_install_bakes_the_image_key_root_only_and_the_installed_copy_opens(cfg, ec2, bootstrap_server, tmp_path,
                                                                              image_key):
    import stat
    import subprocess

    from tests.pilot_helpers import PILOT

    key_file = tmp_path / "userdata.key"
    key_file.write_text(private_pem(image_key))
    root = tmp_path / "image"
    subprocess.run(["sh", str(PILOT / "install.sh"), "--root", str(root), "--image-key", str(key_file)],
                   capture_output=True, text=True, check=True)
    baked = root / "etc/glidein/userdata.key"
    assert stat.S_IMODE(baked.stat().st_mode) == 0o600 and baked.read_text() == key_file.read_text()
    assert (root / "usr/libexec/glidein/x25519_open.py").is_file()
    public = tmp_path / "userdata.pub"
    public.write_text(U.image_public_pem(image_key))
    refused = subprocess.run(["sh", str(PILOT / "install.sh"), "--root", str(root), "--image-key", str(public)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "is not a PEM private key" in refused.stderr

    (iid,), _ = launch(cfg)
    vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_VERIFIER": "python3"},
            wrapper=root / "usr/libexec/glidein/glidein-wrapper.sh")
    vm.env["GLIDEIN_USERDATA_KEY"] = str(baked)
    logs = booted_ok(vm, vm.boot(str(_envelope(tmp_path, userdata_of(ec2, iid))), iid), iid, bootstrap_server)
    assert "envelope decrypted with python3" in logs["glidein.log"]
