"""Signing key rotation: the real wrapper picks the baked key the envelope names, against the real service and moto.

The factory's keys come from Airflow connections (``AIRFLOW_CONN_*``). A
rotation as README "Rotating the signing key" does it: images are baked with
the new key and the current one (``pubkey``, ``pubkey --previous``,
``install.sh --previous-pubkey``), then the factory switches to the new key and
keeps the old one as previous. Pilots launched before the switch still boot;
an image that lacks the key an envelope names stops, naming both ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import keys
from airflow_glidein.cli import main
from tests.pilot_helpers import PILOT, VM, launch, pilot_config, userdata_of
from tests.test_wrapper_paths import booted_ok

pytestmark = pytest.mark.usefixtures("airflow_db")
VERIFIERS = ["python3", "openssl"]


@pytest.fixture
def cfg(ec2, bootstrap_server, tmp_path, monkeypatch):
    return pilot_config(tmp_path, monkeypatch, bootstrap_server, collector="cm.example.org:9618")


@pytest.fixture
def old():
    return U.generate_key()


@pytest.fixture
def new():
    return U.generate_key()


def sign_with(monkeypatch, current, previous=None) -> None:
    """The factory's signing key connection (and the previous key in its extra), read afresh."""
    conn = {"conn_type": "generic", "password": U.private_pem(current)}
    if previous is not None:
        conn["extra"] = {"previous_key": U.public_pem(previous)}
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY", json.dumps(conn))
    monkeypatch.setattr(keys, "_cache", {})


def envelope_of(ec2, tmp_path, cfg, name: str) -> tuple[str, str]:
    """Launch one pilot; (its instance id, the path of its UserData as a file)."""
    (iid,), _ = launch(cfg)
    path = tmp_path / name
    path.write_bytes(userdata_of(ec2, iid))
    return iid, str(path)


def pubkey_cli(capsys, *args: str) -> str:
    assert main(["pubkey", *args]) == 0
    return capsys.readouterr().out


def bake(tmp_path, name: str, *options: str) -> Path:
    """The root of an image baked by install.sh."""
    root = tmp_path / name
    subprocess.run(["sh", str(PILOT / "install.sh"), "--root", str(root), "--no-enable", *options],
                   capture_output=True, text=True, check=True)
    return root


def vm_of(tmp_path, image: Path, name: str, server, verifier: str) -> VM:
    """A VM of that image: its installed wrapper and the keys baked into it."""
    return VM(tmp_path / name, server, {"GLIDEIN_PUBKEY_FILE": str(image / "etc/glidein/factory.pub"),
                                        "GLIDEIN_VERIFIER": verifier},
              wrapper=image / "usr/libexec/glidein/glidein-wrapper.sh")


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_an_envelope_signed_with_the_previous_key_still_boots(cfg, ec2, bootstrap_server, tmp_path, monkeypatch,
                                                               capsys, old, new, verifier):
    sign_with(monkeypatch, old)
    before_iid, before = envelope_of(ec2, tmp_path, cfg, "before-the-switch")
    # 1-2: a new key; images baked with it and with the key the factory signs with now
    (tmp_path / "new.pub").write_text(U.public_pem(new))
    (tmp_path / "old.pub").write_text(pubkey_cli(capsys))
    image = bake(tmp_path, "image", "--pubkey", str(tmp_path / "new.pub"), "--previous-pubkey",
                 str(tmp_path / "old.pub"))
    # 3: the switch: the factory signs with the new key, the old one is the previous key
    sign_with(monkeypatch, new, previous=old)
    assert pubkey_cli(capsys) == U.public_pem(new) and pubkey_cli(capsys, "--previous") == U.public_pem(old)
    after_iid, after = envelope_of(ec2, tmp_path, cfg, "after-the-switch")
    assert U.parse(open(before).read())["key_id"] == U.key_id(old)
    assert U.parse(open(after).read())["key_id"] == U.key_id(new)

    vm = vm_of(tmp_path, image, "vm-before", bootstrap_server, verifier)
    logs = booted_ok(vm, vm.boot(before, before_iid), before_iid, bootstrap_server)
    assert (f"envelope signature verified with {verifier if verifier == 'python3' else 'openssl (OpenSSL'}"
            in logs["glidein.log"])
    assert f", factory key id {U.key_id(old)} {image}/etc/glidein/factory.pub.previous\n" in logs["glidein.log"]
    vm = vm_of(tmp_path, image, "vm-after", bootstrap_server, verifier)
    logs = booted_ok(vm, vm.boot(after, after_iid), after_iid, bootstrap_server)
    assert f", factory key id {U.key_id(new)} {image}/etc/glidein/factory.pub\n" in logs["glidein.log"]


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_an_unknown_key_id_is_refused_naming_both_ids(cfg, ec2, bootstrap_server, tmp_path, monkeypatch, old, new,
                                                     verifier):
    """An image baked before the rotation (only the old key) gets an envelope signed with the new one."""
    sign_with(monkeypatch, new, previous=old)
    iid, envelope = envelope_of(ec2, tmp_path, cfg, "envelope")
    vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_VERIFIER": verifier})
    (vm.root / "factory.pub").write_text(U.public_pem(old))
    proc = vm.boot(envelope, iid)
    assert proc.returncode == 1
    assert (f"STOP: the envelope is signed with factory key id {U.key_id(new)}, but this image carries key id "
            f"{U.key_id(old)} ({vm.root}/factory.pub)") in proc.stderr
    assert "refusing to run anything" in proc.stderr
    assert not (vm.work / "glidein-startup.sh").exists() and vm.powered_off


def test_pinned_fingerprints_fetch_the_key_the_envelope_names(cfg, ec2, bootstrap_server, tmp_path, monkeypatch,
                                                             old, new):
    """An image that bakes no key pins both fingerprints; the service serves the previous key by its id."""
    sign_with(monkeypatch, old)
    iid, envelope = envelope_of(ec2, tmp_path, cfg, "envelope")
    sign_with(monkeypatch, new, previous=old)
    pins = " ".join(hashlib.sha256(U.public_pem(k).encode()).hexdigest() for k in (new, old))
    vm = VM(tmp_path / "vm", bootstrap_server)
    vm.env.update(GLIDEIN_PUBKEY_FILE=str(tmp_path / "not-baked.pub"), GLIDEIN_PUBKEY_SHA256=pins)
    logs = booted_ok(vm, vm.boot(envelope, iid), iid, bootstrap_server)
    assert f"factory key id {U.key_id(old)} {vm.work}/factory.pub" in logs["glidein.log"]


def test_an_envelope_without_a_key_id_is_checked_with_the_baked_key(cfg, ec2, bootstrap_server, tmp_path,
                                                                    monkeypatch, new):
    """A factory from before key ids: the wrapper checks its envelope with factory.pub, as before."""
    sign_with(monkeypatch, new)
    iid, envelope = envelope_of(ec2, tmp_path, cfg, "envelope")
    body = U.encode_body({k: v for k, v in U.parse(open(envelope).read()).items() if k != "key_id"})
    with open(envelope, "w") as f:
        f.write(f"#glidein-envelope v1\n{base64.b64encode(body).decode()}\n{base64.b64encode(new.sign(body)).decode()}\n")
    vm = VM(tmp_path / "vm", bootstrap_server)
    logs = booted_ok(vm, vm.boot(envelope, iid), iid, bootstrap_server)
    assert "the envelope names no key id (a factory from before key rotation): checking it with" in logs["glidein.log"]


def test_a_key_in_the_key_directory_is_picked_and_each_carried_id_is_named(cfg, ec2, bootstrap_server, tmp_path,
                                                                           monkeypatch, old, new):
    """Images may carry their keys as a directory (factory.pub.d/*.pub) besides factory.pub."""
    sign_with(monkeypatch, old)
    iid, envelope = envelope_of(ec2, tmp_path, cfg, "envelope")
    vm = VM(tmp_path / "vm", bootstrap_server)
    third = U.generate_key()
    (vm.root / "factory.pub").write_text(U.public_pem(new))
    (vm.root / "factory.pub.d").mkdir()
    (vm.root / "factory.pub.d" / "a-third.pub").write_text(U.public_pem(third))
    (vm.root / "factory.pub.d" / "old.pub").write_text(U.public_pem(old))
    logs = booted_ok(vm, vm.boot(envelope, iid), iid, bootstrap_server)
    assert f"factory key id {U.key_id(old)} {vm.root}/factory.pub.d/old.pub\n" in logs["glidein.log"]
    # without it: every key the image carries is named
    (vm.root / "factory.pub.d" / "old.pub").unlink()
    vm = VM(tmp_path / "vm2", bootstrap_server, {"GLIDEIN_PUBKEY_FILE": str(vm.root / "factory.pub")})
    proc = vm.boot(envelope, iid)
    assert proc.returncode == 1
    assert (f"signed with factory key id {U.key_id(old)}, but this image carries key id {U.key_id(new)} "
            f"({tmp_path}/vm/factory.pub), {U.key_id(third)} ({tmp_path}/vm/factory.pub.d/a-third.pub)") in proc.stderr
