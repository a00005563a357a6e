"""What the pilot-side tests share: the real bootstrap service on 127.0.0.1, launches, booting a VM here.

The bootstrap service runs inside the real Airflow API server app
(``airflow.api_fastapi.app.create_app``), which mounts our plugin's FastAPI
app at /glidein, served by uvicorn in a thread. "Booting" a VM runs the real
wrapper (``sh glidein-wrapper.sh``) with every metadata URL, config-drive and
context path, public key and power-off command pointed at this machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from airflow_glidein.hooks import LaunchSpec, pilot_hook
from tests.helpers import REPO, example_config, write_config

PILOT = REPO / "airflow_glidein" / "pilot"
WRAPPER = PILOT / "glidein-wrapper.sh"
STANDINS = Path(__file__).resolve().parent / "standins"


class BootstrapServer:
    """The Airflow API server app (with our plugin) under uvicorn on 127.0.0.1."""

    def __init__(self) -> None:
        import uvicorn
        from airflow.api_fastapi.app import create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app("core")
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the API server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def admin_headers(self) -> dict[str, str]:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
        return {"Authorization": f"Bearer {token}"}

    def logs(self, entry: str, pilot_id: str) -> dict[str, str]:
        """A pilot's uploaded logs, read back through the authenticated viewer routes."""
        h = self.admin_headers()
        index = httpx.get(f"{self.url}/glidein/pilots/{entry}/{pilot_id}/logs.json", headers=h)
        index.raise_for_status()
        return {f["name"]: httpx.get(f"{self.url}/glidein/pilots/{entry}/{pilot_id}/logs/{f['name']}",
                                     headers=h).text for f in index.json()["logs"]}


def pilot_config(tmp_path: Path, monkeypatch, server: BootstrapServer, **factory: Any) -> dict:
    cfg = example_config()
    cfg["factory"].update({"retry_delay": 0, "bootstrap_url": f"{server.url}/glidein", **factory})
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


def launch(cfg: dict, entry_name: str = "aws-us-east-1", count: int = 1, launch_id: str | None = None,
           now: float | None = None, **batch: Any) -> tuple[list[str], str]:
    """One launch the way SubmitPilotsOperator makes it (register, sign, create): (instance ids, UserData)."""
    from airflow_glidein.bootstrap.launches import userdata_for
    from airflow_glidein.config import get_config

    config = get_config()
    entry = config.entry(entry_name)
    conn = "glidein_aws_demo"
    b = {"launch_id": launch_id or f"t{time.monotonic_ns()}.cms.{entry_name}.0", "frontend": "cms", "count": count,
         "pilot": "cms-pool-token", "start_expr": "TARGET.RequestCpus <= MY.Cpus",
         "policy": config.policy_for(entry, "cms").model_dump(), **batch}
    text = userdata_for(config, entry, b, conn, now=now)
    spec = LaunchSpec(launch_id=b["launch_id"], frontend="cms", count=count, image=entry.image, userdata=text)
    made = pilot_hook(entry, config.factory.name, conn).launch(spec)
    return made["created"], text


def userdata_of(ec2, instance_id: str, region: str = "us-east-1") -> bytes:
    attr = ec2.client(region).describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"])


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@dataclass
class VM:
    """One VM "booted" on this machine: its work dir, the stand-in condor_master on PATH, overrides."""

    root: Path
    server: BootstrapServer
    env: dict[str, str] = field(default_factory=dict)
    wrapper: Path = WRAPPER

    def __post_init__(self) -> None:
        self.work = self.root / "var-lib-glidein"
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True)
        master = bin_dir / "condor_master"
        master.write_text(f"#!{sys.executable}\n" + (STANDINS / "condor_master.py").read_text())
        master.chmod(0o755)
        pub = self.root / "factory.pub"
        pub.write_text(httpx.get(f"{self.server.url}/glidein/bootstrap/pubkey.pem").text)
        dead = closed_port_url()
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "HOME": str(self.root),
            "AWS_EC2_METADATA_DISABLED": "true",
            "GLIDEIN_WRAPPER_CONF": str(self.root / "no-wrapper.conf"),
            "GLIDEIN_WORKDIR": str(self.work),
            # every place the wrapper looks points at this machine; nothing reaches 169.254.169.254
            "GLIDEIN_IMDS_URL": dead,
            "GLIDEIN_OPENSTACK_METADATA_URL": f"{dead}/openstack/latest",
            "GLIDEIN_CONFIG_DRIVE_DIR": str(self.root / "no-config-drive"),
            "GLIDEIN_ONE_CONTEXT": str(self.root / "no-context.sh"),
            "GLIDEIN_PUBKEY_FILE": str(pub),
            "GLIDEIN_POWEROFF_CMD": f"echo powered-off >> {self.root / 'poweroff'}",
            "GLIDEIN_CONNECT_TIMEOUT": "2",
            "GLIDEIN_HTTP_TIMEOUT": "30",
            **self.env,
        }

    def wrapper_cmd(self, *args: str) -> list[str]:
        for key in ("GLIDEIN_IMDS_URL", "GLIDEIN_OPENSTACK_METADATA_URL", "GLIDEIN_POWEROFF_CMD"):
            assert "169.254" not in self.env[key] and "poweroff" not in self.env[key].split()[0], key
        return ["sh", str(self.wrapper), *args]

    def boot(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        self.env.update(env)
        return subprocess.run(self.wrapper_cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        self.env.update(env)
        return subprocess.Popen(self.wrapper_cmd(*args), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    @property
    def powered_off(self) -> bool:
        return (self.root / "poweroff").exists()

    def condor_config(self) -> str:
        return (self.work / "condor" / "condor_config").read_text()

    def config_drive(self, userdata: bytes, instance_id: str) -> None:
        d = self.root / "config-drive" / "openstack" / "latest"
        d.mkdir(parents=True)
        (d / "user_data").write_bytes(userdata)
        (d / "meta_data.json").write_text(json.dumps({"uuid": instance_id, "name": "glidein"}, indent=2))
        self.env["GLIDEIN_CONFIG_DRIVE_DIR"] = str(self.root / "config-drive")

    def one_context(self, userdata: bytes, instance_id: str) -> None:
        ctx = self.root / "context.sh"
        ctx.write_text("# Context variables generated by OpenNebula\n"
                       f"DISK_ID='1'\nETH0_IP='192.0.2.5'\nUSERDATA_ENCODING='base64'\n"
                       f"USER_DATA='{base64.b64encode(userdata).decode()}'\nVMID='{instance_id}'\n")
        self.env["GLIDEIN_ONE_CONTEXT"] = str(ctx)


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
