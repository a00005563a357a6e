"""The image recipe: install.sh lays the pilot out as glidein-pilot.service expects, and that copy boots.

A real image build and boot cannot run here (no VMs); this checks the files
the recipe installs and runs the installed wrapper against the real service.
"""

from __future__ import annotations

import configparser
import subprocess

import pytest

from tests.pilot_helpers import PILOT, VM, launch, pilot_config, userdata_of

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_installed_pilot_matches_its_unit_and_boots(ec2, bootstrap_server, tmp_path, monkeypatch):
    root = tmp_path / "image"
    pub = tmp_path / "factory.pub"
    import httpx

    pub.write_text(httpx.get(f"{bootstrap_server.url}/glidein/bootstrap/pubkey.pem").text)
    out = subprocess.run(["sh", str(PILOT / "install.sh"), "--root", str(root), "--pubkey", str(pub),
                          "--sources", "imdsv2 imdsv1"], capture_output=True, text=True, check=True)
    assert "glidein pilot installed" in out.stdout
    unit = configparser.ConfigParser(strict=False)
    unit.read(root / "etc/systemd/system/glidein-pilot.service")
    exec_start = unit["Service"]["ExecStart"].split()
    wrapper = root / exec_start[-1].lstrip("/")
    assert exec_start[0] == "/bin/sh" and wrapper.is_file()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert (root / "etc/systemd/system/multi-user.target.wants/glidein-pilot.service").is_symlink()
    assert (root / "etc/glidein/factory.pub").read_text() == pub.read_text()
    assert (root / "etc/glidein/wrapper.conf").read_text() == 'GLIDEIN_USERDATA_SOURCES="imdsv2 imdsv1"\n'

    cfg = pilot_config(tmp_path, monkeypatch, bootstrap_server)
    (iid,), _ = launch(cfg)
    envelope = tmp_path / "envelope"
    envelope.write_bytes(userdata_of(ec2, iid))
    vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_VERIFIER": "python3"}, wrapper=wrapper)
    vm.env["GLIDEIN_PUBKEY_FILE"] = str(root / "etc/glidein/factory.pub")
    proc = vm.boot(str(envelope), iid)
    assert proc.returncode == 0, proc.stderr
    assert "signature verified with python3" in proc.stderr  # the installed ed25519_verify.py
