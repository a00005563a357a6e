"""The soak's pool stand-in works across processes: another Python process, given only the soak's
site folder on its PYTHONPATH (never the repository root), reaches it through the real product
code (HTCondorHook over htcondor2) as the Airflow processes of the soak do, and a pilot's startd
stand-in claims, runs and finishes jobs through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.soak.pool import PoolService
from tests.soak.topology import REPO, SITE

CHILD = r"""
import json, os, sys
import htcondor2
assert htcondor2.Collector.__module__ == "glidein_soak_condor", htcondor2.Collector.__module__
assert os.environ["REPO"] not in [os.path.abspath(p) for p in sys.path], "the repository root is on the path"
from airflow_glidein.hooks.htcondor import HTCondorHook
hook = HTCondorHook(collector="soak-collector.test:9618")
names = hook.schedd_names([])
demand = hook.query_demand("schedd-cms", "true", ["RequestCpus", "DESIRED_Sites"], old_before=0)
startds = hook.query_startds('GLIDEIN_Factory == "soak"', ["GLIDEIN_PILOT_ID", "State", "Name"])
hook.retire_startd("slot1@i-0001")
try:
    hook.retire_startd("slot1@i-nobody")
    refused = None
except htcondor2.HTCondorException as exc:
    refused = str(exc)
print(json.dumps({"names": names, "demand": demand, "startds": startds, "refused": refused}))
"""


@pytest.fixture
def service():
    svc = PoolService().start()
    svc.pool.add_schedd("schedd-cms")
    svc.add_jobs("schedd-cms", 3, {"RequestCpus": 1, "DESIRED_Sites": "SOAK_EAST", "SoakRuntime": 5})
    yield svc
    svc.stop()


def _startd(svc: PoolService, pilot: str, start: str = "TARGET.RequestCpus <= MY.Cpus") -> str:
    import classad2

    ad = classad2.ClassAd({"Name": f"slot1@{pilot}", "MyType": "Machine", "GLIDEIN_PILOT_ID": pilot,
                           "GLIDEIN_Factory": "soak", "GLIDEIN_Site": "SOAK_EAST", "State": "Unclaimed",
                           "Cpus": 1, "MyAddress": f"<127.0.0.1:9618?CCBID=soak#{pilot}>"})
    ad["START"] = classad2.ExprTree(start)
    svc.op_startd_advertise(str(ad))
    return f"slot1@{pilot}"


def test_another_process_queries_and_retires_through_the_product_code(service):
    _startd(service, "i-0001")
    env = {**os.environ, "PYTHONPATH": str(SITE), "GLIDEIN_SOAK_POOL_URL": service.url, "REPO": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(SITE))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["names"] == ["schedd-cms"]
    assert out["demand"]["mode"] == "groupby"
    assert [a["JobCount"] for a in out["demand"]["ads"]] == [3]
    assert out["startds"] == [{"GLIDEIN_PILOT_ID": "i-0001", "State": "Unclaimed", "Name": "slot1@i-0001"}]
    assert "i-nobody" in out["refused"]
    assert service.op_startd_commands("slot1@i-0001") == ["OffPeaceful"]  # what the startd reads next


def test_a_startd_claims_what_its_start_accepts_and_finishes_it(service):
    picky = _startd(service, "i-0002", start="TARGET.RequestCpus > 4")
    assert service.op_startd_claim(picky) is None  # START refuses every job
    name = _startd(service, "i-0003")
    job = service.op_startd_claim(name)
    assert job["schedd"] == "schedd-cms" and job["runtime"] == 5
    assert service.counts() == {"schedd-cms": {"idle": 2, "running": 1}}
    service.op_job_done(job["schedd"], job["job"], "i-0003")
    assert service.counts() == {"schedd-cms": {"idle": 2, "running": 0}}
    job = service.op_startd_claim(name)
    service.op_job_requeue(job["schedd"], job["job"])  # the pilot died: the job is idle again
    assert service.counts() == {"schedd-cms": {"idle": 2, "running": 0}}
