"""``python -m airflow_glidein serve-bootstrap``: the service on its own, sharing state and logs with the plugin's.

The standalone process and the Airflow API server (our plugin) are two
replicas over one state store and one log folder: a token exchanged on one is
used up on the other, and logs uploaded to one are read through the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from airflow_glidein.bootstrap.launches import STARTUP_SCRIPT
from airflow_glidein.userdata import parse
from tests.helpers import REPO, write_config
from tests.pilot_helpers import VM, closed_port_url, launch, pilot_config

pytestmark = pytest.mark.usefixtures("airflow_db")


def serve_bootstrap(cfg_path, *args: str, scheme: str = "http", verify: Any = True):
    """``python -m airflow_glidein serve-bootstrap`` in a process on a free port; (process, base URL) once it answers."""
    port = int(closed_port_url().rsplit(":", 1)[1])
    url = f"{scheme}://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "airflow_glidein", "serve-bootstrap", str(cfg_path),
                             "--port", str(port), *args], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/glidein/bootstrap/startup.sh", verify=verify).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read() if proc.stdout else "serve-bootstrap did not start")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.fixture
def standalone(ec2, bootstrap_server, tmp_path, monkeypatch):
    cfg = pilot_config(tmp_path, monkeypatch, bootstrap_server)
    proc, url = serve_bootstrap(tmp_path / "glidein.yaml")
    yield cfg, url
    stop(proc)


def test_standalone_serves_pilots_and_shares_state_with_the_plugin(standalone, bootstrap_server, tmp_path):
    cfg, url = standalone
    assert httpx.get(f"{url}/glidein/bootstrap/startup.sh").content == STARTUP_SCRIPT.read_bytes()
    assert httpx.get(f"{url}/glidein/bootstrap/pubkey.pem").text == \
        httpx.get(f"{bootstrap_server.url}/glidein/bootstrap/pubkey.pem").text
    assert httpx.get(f"{url}/glidein/pilots").status_code == 404  # the viewer lives in the Airflow UI only

    # a pilot of a factory whose bootstrap_url is the standalone replica ...
    cfg["factory"]["bootstrap_url"] = f"{url}/glidein"
    write_config(tmp_path, cfg)
    (iid,), text = launch(cfg)
    fields = parse(text)
    assert fields["bootstrap_url"] == f"{url}/glidein"
    envelope = tmp_path / "envelope"
    envelope.write_text(text)
    vm = VM(tmp_path / "vm", bootstrap_server)
    proc = vm.boot(str(envelope), iid)
    assert proc.returncode == 0, proc.stderr
    # ... its logs are read through the plugin's viewer, and its token is used up there too
    assert "StandinParams.json" in bootstrap_server.logs("aws-us-east-1", iid)
    again = httpx.post(f"{bootstrap_server.url}/glidein/bootstrap/exchange", params={"instance_id": iid},
                       headers={"Authorization": f"Bearer {fields['token']}"})
    assert again.status_code == 403 and "already exchanged" in again.text
