"""``python -m airflow_glidein``: stdout carries only a command's output, and mistakes get a message, not a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from airflow_glidein import userdata as U
from airflow_glidein.bootstrap import keys
from airflow_glidein.cli import main
from airflow_glidein.state import store
from tests.helpers import REPO
from tests.pilot_helpers import PILOT


def cli(*args: str, env: dict[str, str] | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow_glidein", *args], cwd=REPO, env=env or dict(os.environ),
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


def test_pubkey_redirected_to_a_file_is_the_key_the_python_verifier_reads(tmp_path):
    """`pubkey > factory.pub` used to catch Airflow's warning line too, and the python3 verifier refused the file."""
    pub = tmp_path / "factory.pub"
    with pub.open("w") as out:
        proc = cli("pubkey", stdout=out)
    assert proc.returncode == 0, proc.stderr
    assert "signing UserData envelopes with a key generated into the state store" in proc.stderr  # the warning
    key = keys.signing_key(store())  # the key the command generated into this test's state store
    assert pub.read_text() == U.public_pem(key)
    assert f"# key id {U.key_id(key)}; sha256 fingerprint (GLIDEIN_PUBKEY_SHA256): {U.fingerprint(pub.read_text())}" \
        in proc.stderr
    (tmp_path / "msg").write_bytes(b"an envelope body")
    (tmp_path / "sig").write_bytes(key.sign(b"an envelope body"))
    check = subprocess.run(["python3", str(PILOT / "ed25519_verify.py"), str(pub), str(tmp_path / "msg"),
                            str(tmp_path / "sig")], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == "Signature Verified Successfully\n", check.stderr


def test_pubkey_prints_the_current_or_the_previous_key(monkeypatch, capsys):
    new, old = U.generate_key(), U.generate_key()
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY", json.dumps(
        {"conn_type": "generic", "password": U.private_pem(new), "extra": {"previous_key": U.public_pem(old)}}))
    assert main(["pubkey"]) == 0
    out, err = capsys.readouterr()
    assert out == U.public_pem(new)
    assert f"# the previous key, id {U.key_id(old)}, is still accepted: `pubkey --previous > factory.pub.previous`" \
        in err
    assert main(["pubkey", "--previous"]) == 0
    out, err = capsys.readouterr()
    assert out == U.public_pem(old) and f"# key id {U.key_id(old)};" in err


def test_pubkey_without_a_previous_key_or_with_a_broken_one_says_so(monkeypatch, capsys):
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY", json.dumps(
        {"conn_type": "generic", "password": U.private_pem(U.generate_key())}))
    assert main(["pubkey", "--previous"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pubkey: no previous signing key is configured")
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_SIGNING_KEY", json.dumps({"conn_type": "generic", "password": "x" * 40}))
    keys._cache.clear()
    assert main(["pubkey"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pubkey: connection glidein_signing_key: signing key: ")
    assert "x" * 40 not in err


def test_genkey_writes_the_private_key_mode_0600_and_never_over_a_file(tmp_path, capsys):
    path = tmp_path / "signing.key"
    old = os.umask(0)  # even a permissive umask leaves the key private
    try:
        assert main(["genkey", str(path)]) == 0
    finally:
        os.umask(old)
    out, err = capsys.readouterr()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = U.private_key_from_text(path.read_text())
    assert out == U.public_pem(key) and f"key id {U.key_id(key)}" in err
    assert main(["genkey", str(path)]) == 1
    assert "cannot create" in capsys.readouterr().err
    assert U.key_id(U.private_key_from_text(path.read_text())) == U.key_id(key)  # untouched


def test_serve_bootstrap_without_a_config_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__GLIDEIN__CONFIG_FILE"}
    proc = cli("serve-bootstrap", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("serve-bootstrap: no configuration file: name it, or set [glidein] "
                                        "config_file (AIRFLOW__GLIDEIN__CONFIG_FILE)")
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1", "http"])
def test_serve_bootstrap_refuses_a_port_outside_1_to_65535(port, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve-bootstrap", str(REPO / "examples" / "glidein.yaml"), "--port", port])
    assert exc.value.code == 2
    assert "argument --port: a TCP port is a number from 1 to 65535" in capsys.readouterr().err


def test_sync_pools_on_an_unmigrated_database_says_to_migrate(tmp_path):
    home = tmp_path / "airflow-home"
    home.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db"}
    proc = cli("sync-pools", str(REPO / "examples" / "glidein.yaml"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "sync-pools: cannot write Airflow's pools (no such table: slot_pool): is Airflow's metadata database "
        "reachable and migrated? Run `airflow db migrate` first")
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
