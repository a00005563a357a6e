"""The deployment of docker/compose.yaml as local processes on 127.0.0.1, for the soak.

Real Airflow 3.3 components on a throwaway PostgreSQL cluster with the CeleryExecutor on Redis
(DB 5): ``airflow db migrate``, scheduler, dag-processor, triggerer, two ``airflow api-server``
behind HAProxy running docker/haproxy.cfg (public side: only /glidein/bootstrap/; internal side:
the UI and the Execution API the workers call), and two ``airflow celery worker``. Every long-running
component is supervised (restarted when it dies). Test-only code reaches the Airflow processes
through tests/soak/site on their PYTHONPATH, never the repository root.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.soak.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "site"
HAPROXY_CFG = REPO / "docker" / "haproxy.cfg"
AIRFLOW = [sys.executable, "-m", "airflow"]  # the venv's own Airflow, whatever a console script says
REDIS_DB = 5
FRONTENDS = ("cms", "atlas")
REGIONS = {"us-east-1": "SOAK_EAST", "us-west-2": "SOAK_WEST"}

# Settings a killed component's work needs to come back within the run (defaults in brackets):
TIMEOUTS = {
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",  # [600] a task queued to a worker that died
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "15",  # [120]
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",  # [300] a running task whose worker died
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",  # [10]
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "20",  # [30] triggers of a dead triggerer move
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "600",  # [86400] unacked messages
    # A loaded 2-core machine answers slowly: a task must not kill itself over a slow heartbeat.
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # [5.0]
    "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "6",  # [3]
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak_config(bootstrap_url: str, poll: float) -> dict[str, Any]:
    """Two frontends, two regions; small pilots so jobs and pilots go one to one; short timeouts."""
    entries = [{
        "name": f"soak-{region}", "middleware": "ec2", "region": region, "image": "ami-1e749f67",
        "flavor": "t3.small", "cores": 1, "memory_mb": 2000, "attrs": {"GLIDEIN_Site": site},
        "trust_domain": "aws", "auth_method": "key_pair",
        "limits": {"max_pilots": 12, "max_idle": 8, "max_per_cycle": 8, "batch_size": 4},
        "policy": {"boot_timeout": 300, "idle_timeout": 60, "max_lifetime": 7200, "retire_window": 600,
                   "min_idle_lifetime": 600},
        "api_budget": {"requests": 120, "per_seconds": 60, "concurrency": 4},
    } for region, site in REGIONS.items()]
    frontends = [{
        "name": fe, "schedule": "*/5 * * * *",  # bursts come through the watcher
        "watch": {"threshold": 1, "poll": poll, "min_interval": 20},
        "demand": {"collector": "soak-collector.test:9618", "schedds": [f"schedd-{fe}"], "timeout": 30},
        "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)",
        "start_expr": f'TARGET.SoakFrontend == "{fe}" && TARGET.RequestCpus <= MY.Cpus',
        "entries": [e["name"] for e in entries],
        "credentials": ["soak-aws", "soak-pool-token"],
        "limits": {"max_idle": 16, "max_running": 24, "max_idle_per_entry": 8, "max_running_per_entry": 12},
        "request_ttl": 600,
    } for fe in FRONTENDS]
    return {
        "factory": {"name": "soak", "bootstrap_url": bootstrap_url, "schedule": "*/2 * * * *",
                    "collector": "soak-collector.test:9618", "limits": {"max_pilots": 40, "max_idle": 24},
                    "retries": 3, "retry_delay": 10, "verify_timeout": 180, "verify_poll": 5},
        "entries": entries,
        "frontends": frontends,
        "credentials": [
            {"id": "soak-aws", "type": "ec2_key_pair", "conn_id": "soak_aws", "trust_domain": "aws",
             "purpose": "provision"},
            {"id": "soak-pool-token", "type": "idtoken", "conn_id": "soak_pool_token", "trust_domain": "aws",
             "purpose": "pilot"},
        ],
    }


def signing_key() -> tuple[str, str]:
    """(base64 seed for the connection, public PEM for the VM image)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = secrets.token_bytes(32)
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return base64.b64encode(seed).decode(), pub


class Topology:
    def __init__(self, run_dir: Path, pg: Any, ec2_url: str, pool_url: str, poll: float, pool_token: str) -> None:
        self.dir = run_dir
        self.home = run_dir / "airflow-home"
        self.logs = run_dir / "logs"
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.pg = pg
        self.ports = {name: free_port() for name in ("public", "internal", "api1", "api2")}
        self.public = f"http://127.0.0.1:{self.ports['public']}"
        self.internal = f"http://127.0.0.1:{self.ports['internal']}"
        seed, self.pubkey = signing_key()
        self.config = self.dir / "glidein.yaml"
        self.config.write_text(yaml.safe_dump(soak_config(f"{self.public}/glidein", poll), sort_keys=False))
        self.pilot_logs = self.dir / "pilot-logs"
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url("airflow"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg.url("airflow"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "6",
            "AIRFLOW__API__BASE_URL": self.internal,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.internal}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "60",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **TIMEOUTS,
            "AIRFLOW__GLIDEIN__CONFIG_FILE": str(self.config),
            "AIRFLOW__GLIDEIN__PILOT_LOGS": f"file://{self.pilot_logs}",
            "AIRFLOW_CONN_GLIDEIN_STATE": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": pg.port,
                                                      "login": "postgres", "schema": "glidein_state"}),
            "AIRFLOW_CONN_GLIDEIN_SIGNING_KEY": json.dumps({"conn_type": "generic", "password": seed}),
            "AIRFLOW_CONN_SOAK_AWS": json.dumps({"conn_type": "aws", "login": "soak-access-key",
                                                 "password": "soak-secret-key", "extra": {"endpoint_url": ec2_url}}),
            "AIRFLOW_CONN_SOAK_POOL_TOKEN": json.dumps({"conn_type": "glidein_token", "password": pool_token}),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONPATH": str(SITE),  # the pool patch; never the repository root
            "GLIDEIN_SOAK_POOL_URL": pool_url,
            "NO_PROXY": "*",
        }
        self.sup = Supervisor()

    def airflow(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*AIRFLOW, *args], env=self.env, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def prepare(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()  # DB 5 is the soak's
        self.pg.create_database("airflow")
        self.pg.create_database("glidein_state")
        self.airflow("db", "migrate")
        done = subprocess.run([sys.executable, "-m", "airflow_glidein", "sync-pools"], env=self.env, cwd=self.dir,
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"sync-pools failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        """Every component under the supervisor, as docker/compose.yaml lays them out."""
        env, log = self.env, lambda name: self.logs / f"{name}.log"
        add = self.sup.add
        add("scheduler", [*AIRFLOW, "scheduler", "--skip-serve-logs"], env, log("scheduler"))
        add("dag-processor", [*AIRFLOW, "dag-processor"], env, log("dag-processor"))
        add("triggerer", [*AIRFLOW, "triggerer", "--skip-serve-logs"], env, log("triggerer"))
        for n in (1, 2):
            add(f"api-server-{n}", [*AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.ports[f"api{n}"]),
                                    "--workers", "1", "--pid", str(self.dir / f"api-server-{n}.pid")],
                env, log(f"api-server-{n}"))
            add(f"worker-{n}", [*AIRFLOW, "celery", "worker", "--concurrency", "6", "--skip-serve-logs",
                                "--celery-hostname", f"soak-worker-{n}@%h", "--pid", str(self.dir / f"worker-{n}.pid"),
                                "--without-gossip", "--without-mingle"],
                env, log(f"worker-{n}"))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        add("proxy", [haproxy, "-db", "-f", str(HAPROXY_CFG)],
            {**env, "GLIDEIN_PUBLIC_BIND": f"127.0.0.1:{self.ports['public']}",
             "GLIDEIN_INTERNAL_BIND": f"127.0.0.1:{self.ports['internal']}",
             "GLIDEIN_API_1": f"127.0.0.1:{self.ports['api1']}", "GLIDEIN_API_2": f"127.0.0.1:{self.ports['api2']}"},
            log("proxy"), restart_sec=1.0)
        self.sup.run()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        for port in (self.ports["api1"], self.ports["api2"], self.ports["internal"]):
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"the API server on port {port} did not come up: see {self.logs}")
                time.sleep(1)

    def stop(self) -> None:
        self.sup.stop()
