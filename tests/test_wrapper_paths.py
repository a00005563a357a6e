"""The real wrapper on every UserData path, against the real bootstrap service and moto's EC2.

Each test launches one pilot the way the factory does (registered launch,
signed envelope, RunInstances on moto), reads its UserData back from moto,
delivers it the way one middleware does (a metadata stand-in on 127.0.0.1, a
config-drive folder, an OpenNebula context.sh, a file), and runs
``sh glidein-wrapper.sh``. The instance is an EC2 one in every case: the
service checks it against moto's listing; what differs is how the VM finds
its UserData. A stand-in condor_master (tests/standins/) takes the daemons' place.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.pilot_helpers import VM, launch, pilot_config, userdata_of
from tests.standins.metadata import MetadataServer

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def cfg(ec2, bootstrap_server, tmp_path, monkeypatch):
    return pilot_config(tmp_path, monkeypatch, bootstrap_server, collector="cm.example.org:9618")


def booted_ok(vm: VM, proc, iid: str, server) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    conf = vm.condor_config()
    # the startd names its pilot by entry and instance id (ids collide across endpoints)
    assert f'GLIDEIN_PILOT_ID = "aws-us-east-1/{iid}"' in conf and f'GLIDEIN_Instance_ID = "{iid}"' in conf
    logs = server.logs("aws-us-east-1", iid)
    assert {"glidein.log", "condor_master.stdout", "MasterLog", "StandinParams.json"} <= set(logs)
    params = json.loads(logs["StandinParams.json"])
    assert params["GLIDEIN_PILOT_ID"] == f'"aws-us-east-1/{iid}"'
    assert vm.powered_off
    return logs


def test_imdsv2(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    with MetadataServer("imdsv2", userdata_of(ec2, iid), iid) as md:
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
        proc = vm.boot()
    logs = booted_ok(vm, proc, iid, bootstrap_server)
    assert ("PUT", "/latest/api/token", False) in md.requests
    assert ("GET", "/latest/user-data", True) in md.requests  # with the session token
    assert "UserData from imdsv2" in logs["glidein.log"]


def test_imdsv1_only(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    with MetadataServer("imdsv1", userdata_of(ec2, iid), iid) as md:
        vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
        proc = vm.boot()
    logs = booted_ok(vm, proc, iid, bootstrap_server)
    assert md.requests[0] == ("PUT", "/latest/api/token", False)  # v2 tried first, refused
    assert "no UserData from imdsv2" in logs["glidein.log"] and "UserData from imdsv1" in logs["glidein.log"]


def test_openstack_config_drive(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    vm = VM(tmp_path / "vm", bootstrap_server)
    vm.config_drive(userdata_of(ec2, iid), iid)
    logs = booted_ok(vm, vm.boot(), iid, bootstrap_server)
    assert "UserData from configdrive" in logs["glidein.log"]


def test_openstack_metadata_service(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    with MetadataServer("openstack", userdata_of(ec2, iid), iid) as md:
        # Nova's service answers on the same address as the EC2 one; this stand-in has no EC2 paths
        vm = VM(tmp_path / "vm", bootstrap_server,
                {"GLIDEIN_IMDS_URL": md.url, "GLIDEIN_OPENSTACK_METADATA_URL": f"{md.url}/openstack/latest"})
        proc = vm.boot()
    logs = booted_ok(vm, proc, iid, bootstrap_server)
    assert "no UserData from configdrive" in logs["glidein.log"]
    assert "UserData from openstack" in logs["glidein.log"]
    assert ("GET", "/openstack/latest/meta_data.json", False) in md.requests


def test_opennebula_context(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    vm = VM(tmp_path / "vm", bootstrap_server)
    vm.one_context(userdata_of(ec2, iid), iid)
    logs = booted_ok(vm, vm.boot(), iid, bootstrap_server)
    assert "UserData from opennebula" in logs["glidein.log"]


def test_file_argument_with_wget_and_python_verifier(cfg, ec2, bootstrap_server, tmp_path):
    """A grid pilot: envelope and instance id as arguments; wget instead of curl; python3 checks the signature."""
    (iid,), _ = launch(cfg)
    envelope = tmp_path / "envelope"
    envelope.write_bytes(userdata_of(ec2, iid))
    vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_HTTP_CLIENT": "wget", "GLIDEIN_VERIFIER": "python3"})
    logs = booted_ok(vm, vm.boot(str(envelope), iid), iid, bootstrap_server)
    assert "UserData from file" in logs["glidein.log"]
    assert "signature verified with python3" in logs["glidein.log"]


def test_openssl_verifier_and_pinned_public_key(cfg, ec2, bootstrap_server, tmp_path):
    """No key baked in: the wrapper fetches it from the bootstrap service and checks the pinned fingerprint."""
    import hashlib

    import httpx

    (iid,), _ = launch(cfg)
    pem = httpx.get(f"{bootstrap_server.url}/glidein/bootstrap/pubkey.pem").content
    envelope = tmp_path / "envelope"
    envelope.write_bytes(userdata_of(ec2, iid))
    vm = VM(tmp_path / "vm", bootstrap_server, {"GLIDEIN_VERIFIER": "openssl"})
    vm.env.update(GLIDEIN_PUBKEY_FILE=str(tmp_path / "not-baked.pub"), GLIDEIN_PUBKEY_SHA256=hashlib.sha256(pem).hexdigest(),
                  GLIDEIN_USERDATA_FILE=str(envelope), GLIDEIN_INSTANCE_ID=iid)
    logs = booted_ok(vm, vm.boot(), iid, bootstrap_server)
    assert "signature verified with openssl (OpenSSL" in logs["glidein.log"]


def test_wrong_pin_stops_before_anything_runs(cfg, ec2, bootstrap_server, tmp_path):
    (iid,), _ = launch(cfg)
    envelope = tmp_path / "envelope"
    envelope.write_bytes(userdata_of(ec2, iid))
    vm = VM(tmp_path / "vm", bootstrap_server)
    vm.env.update(GLIDEIN_PUBKEY_FILE=str(tmp_path / "not-baked.pub"), GLIDEIN_PUBKEY_SHA256="0" * 64)
    proc = vm.boot(str(envelope), iid)
    assert proc.returncode == 1
    assert "does not match the pinned fingerprint" in proc.stderr
    assert not (vm.work / "glidein-startup.sh").exists() and vm.powered_off


def test_signal_stops_the_pilot_and_logs_still_come_home(cfg, ec2, bootstrap_server, tmp_path):
    """systemctl stop / shutdown: every process of the unit gets SIGTERM (KillMode=control-group)."""
    (iid,), _ = launch(cfg)
    envelope = tmp_path / "envelope"
    envelope.write_bytes(userdata_of(ec2, iid))
    vm = VM(tmp_path / "vm", bootstrap_server)
    proc = vm.start(str(envelope), iid, STANDIN_MASTER_SLEEP="60")
    out = vm.work / "condor_master.stdout"  # the stand-in says it runs once it has read its configuration
    deadline = time.time() + 30
    while not (out.exists() and "condor_master stand-in running" in out.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    logs = bootstrap_server.logs("aws-us-east-1", iid)
    assert "condor_master exited with status 0: stopped by a signal" in logs["glidein.log"]
    assert "exiting (on SIGTERM)" in logs["MasterLog"]
    assert vm.powered_off
