"""Helpers shared by the tests: Airflow DAG runs from the real dags/ folder, moto, configs."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"


def migrate_db() -> None:
    from airflow.utils.db import initdb

    initdb()


class MotoEC2:
    """moto's real server (ThreadedMotoServer) on 127.0.0.1, an ephemeral port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> None:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.stop()

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req).read()

    def connection_json(self, region: str = "us-east-1") -> str:
        return json.dumps({
            "conn_type": "aws",
            "login": "testing-access-key",
            "password": "testing-secret-key",
            "extra": {"endpoint_url": self.url, "region_name": region},
        })

    def client(self, region: str = "us-east-1"):
        import boto3

        return boto3.client("ec2", region_name=region, endpoint_url=self.url,
                            aws_access_key_id="x", aws_secret_access_key="y")

    def age(self, instance_ids, seconds: float, region: str = "us-east-1") -> None:
        """Move instances' LaunchTime back (moto runs in this process; there is no API for it)."""
        from datetime import timedelta

        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        backend = ec2_backends[DEFAULT_ACCOUNT_ID][region]
        for iid in instance_ids:
            inst = backend.get_instance(iid)
            inst.launch_time = inst.launch_time - timedelta(seconds=seconds)

    def instances(self, region: str = "us-east-1", live_only: bool = True) -> list[dict]:
        out = []
        for page in self.client(region).get_paginator("describe_instances").paginate():
            for r in page["Reservations"]:
                for i in r["Instances"]:
                    if live_only and i["State"]["Name"] in ("terminated", "shutting-down"):
                        continue
                    i["TagMap"] = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                    out.append(i)
        return out


class Clock:
    """The glidein operators' clock, moved forward by the test (providers and Airflow keep real time).

    ``frozen``: it stands still but for ``offset`` (real time does not move it), so a test server
    that shares it (listing lag) sees exactly the offsets the test sets, however slow the machine.
    """

    def __init__(self, monkeypatch, frozen: bool = False):
        import time

        from airflow_glidein.operators.base import GlideinBaseOperator

        self.offset = 0.0
        self.start = time.time() if frozen else None
        monkeypatch.setattr(GlideinBaseOperator, "now", lambda op: self.now())

    def now(self) -> float:
        import time

        return (self.start if self.start is not None else time.time()) + self.offset

    time = now  # a test server's clock too: listing lag and the factory's grace move together


def write_config(tmp_path: Path, data: dict[str, Any], monkeypatch=None, name: str = "glidein.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if monkeypatch is not None:
        monkeypatch.setenv("AIRFLOW__GLIDEIN__CONFIG_FILE", str(path))
    return path


def example_config() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "examples" / "glidein.yaml").read_text())
    for fe in data["frontends"]:
        fe["demand"]["queue_file"] = str(REPO / "examples" / fe["demand"]["queue_file"])
    return data


def write_queue(tmp_path: Path, jobs: list[dict[str, Any]], name: str = "queue.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(jobs))
    return str(path)


def idle_jobs(n: int, sites: str, cpus: int = 1, memory: int = 2000, start: int = 1, status: int = 1) -> list[dict]:
    return [
        {"ClusterId": start, "ProcId": i, "JobStatus": status, "RequestCpus": cpus, "RequestMemory": memory,
         "DESIRED_Sites": sites, "QDate": 1_700_000_000, "Owner": "user"}
        for i in range(n)
    ]


def run_dag(dag_id: str):
    """Parse dags/ like the scheduler does and run one DAG with dag.test(); returns the DagRun."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"{dag_id} not in {sorted(bag.dag_ids)}"
    return dag.test()


def xcom(dagrun, task_id: str, map_index: int | None = -1, key: str = "return_value") -> Any:
    """A task's return value from the metadata DB (tests only; tasks never read it).

    The factory has one task group per API endpoint ("ec2-us-east-1.inventory"):
    a bare name ("inventory") gathers that task of every group: the one value,
    or lists concatenated and dicts merged.
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        ids = [t for t in _task_ids(dagrun, session) if t == task_id or t.endswith("." + task_id)]
        if task_id in ids:
            ids = [task_id]
        rows = session.scalars(XComModel.get_many(
            run_id=dagrun.run_id, dag_ids=dagrun.dag_id, task_ids=ids or task_id, key=key,
            map_indexes=map_index,
        )).all()
        values = [XComModel.deserialize_value(r) for r in sorted(rows, key=lambda r: (r.task_id, r.map_index))]
    if map_index is None:
        return values
    if len(values) <= 1:
        return values[0] if values else None
    return _merge(values)


def _task_ids(dagrun, session) -> list[str]:
    return sorted({ti.task_id for ti in dagrun.get_task_instances(session=session)})


def _merge(values: list) -> Any:
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    if all(isinstance(v, dict) for v in values):
        out: dict = {}
        for v in values:
            for k, x in v.items():
                if k not in out:
                    out[k] = x
                elif isinstance(x, dict) and isinstance(out[k], dict):
                    out[k] = {**out[k], **x}
                elif isinstance(x, bool) or isinstance(out[k], bool):
                    out[k] = out[k] or x
                elif isinstance(x, (int, float)) and isinstance(out[k], (int, float)):
                    out[k] = out[k] + x
                elif isinstance(x, list) and isinstance(out[k], list):
                    out[k] = out[k] + x
        return out
    return values


def task_states(dagrun) -> dict[str, str]:
    """State per task instance ("group.task[map_index]"), plus per bare task name across the
    endpoint groups ("reap_pilots"): that state if they agree, else the states joined by "|"."""
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = dagrun.get_task_instances(session=session)
        full = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state) for ti in tis}
    bare: dict[str, set] = {}
    for name, st in full.items():
        short = name.rsplit(".", 1)[-1].split("[")[0]
        if short != name.split("[")[0]:
            bare.setdefault(short, set()).add(st)
    return {**{k: "|".join(sorted(v)) for k, v in bare.items()}, **full}


def jwt_token(claims: dict[str, Any], signature: str = "c2lnbmF0dXJlLW5vdC1jaGVja2Vk") -> str:
    """A JWT with these claims (HS256 header; the signature is opaque: we never verify it)."""
    import base64

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{signature}"


# The pool's IDTOKEN in the tests' pilot credential connection: a JWT without exp whose
# signature part is a string the secrecy checks look for.
POOL_TOKEN = jwt_token({"iss": "cm.example.org", "sub": "pilot@cm.example.org"}, signature="pool-token-value")


def env_config(path: Path | str) -> None:
    os.environ["AIRFLOW__GLIDEIN__CONFIG_FILE"] = str(path)


def zombies_up_for_retry(dag_id: str) -> str:
    """What the scheduler does with the tasks of a DAG's last run whose process vanished (SIGKILL): up for
    retry. Returns the run's id, for ``resume_run``."""
    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        for ti in run.get_task_instances(session=session):
            if ti.state == TaskInstanceState.RUNNING:
                ti.state = TaskInstanceState.UP_FOR_RETRY
                ti.end_date = pendulum.now("UTC")
        return run.run_id


def resume_run(dag_id: str, run_id: str):
    """Carry on an existing DAG run the way the scheduler would (dag.test's loop, on a run it did not create).

    Used after a task process was SIGKILLed: the test marks the vanished task
    up_for_retry (the scheduler's zombie handling), then this runs what is
    schedulable until the run ends.
    """
    import time

    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    dag = DagBag(dag_folder=str(DAGS)).get_dag(dag_id)
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:
        deadline = time.time() + 300
        while time.time() < deadline:
            session.expire_all()
            dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()
            if dr.state != DagRunState.RUNNING:
                break
            dr.dag = scheduler_dag
            schedulable, _ = dr.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            ready = [ti for ti in dr.get_task_instances(session=session) if ti.state == TaskInstanceState.SCHEDULED]
            if not ready:
                time.sleep(0.2)
            for ti in ready:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
        session.expire_all()
        return session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()


def clear_run(dag_id: str, run_id: str):
    """Clear every task of a finished run (the UI's "Clear" on the run) and let it run again to its end."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import clear_task_instances
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    with create_session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()
        clear_task_instances(dr.get_task_instances(session=session), session, dag_run_state=DagRunState.RUNNING)
    return resume_run(dag_id, run_id)


def entry_down(monkeypatch, entry: str, error: Exception | None = None) -> None:
    """Every EC2 launch at ``entry`` fails (an unreachable endpoint); the other entries launch as usual."""
    from airflow_glidein.hooks.ec2 import EC2PilotHook

    real_create = EC2PilotHook._create

    def create(self, spec, count, tags):
        if self.entry.name == entry:
            raise error or ConnectionError(f"{self.entry.region} endpoint unreachable")
        return real_create(self, spec, count, tags)

    monkeypatch.setattr(EC2PilotHook, "_create", create)
