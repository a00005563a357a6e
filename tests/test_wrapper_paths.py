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
    assert f'GLIDEIN_PILOT_ID = "{iid}"' in conf
    logs = server.logs("aws-us-east-1", iid)
    assert {"glidein.log", "condor_master.stdout", "MasterLog", "StandinParams.json"} <= set(logs)
    params = json.loads(logs["StandinParams.json"])
    assert params["GLIDEIN_PILOT_ID"] == f'"{iid}"'
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
