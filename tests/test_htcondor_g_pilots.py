"""Grid pilots end to end: the DAGs submit to a schedd, a site runs the job, the pilot joins, the factory reaps it.

The frontend and factory DAGs run on an ``htcondor_g`` entry whose schedd is
the stand-in (tests/standins/condor.py, through the real htcondor2 module).
Then the test plays the site: it starts the job (JobCurrentStartDate,
GridJobId) and runs the job's executable the way a worker node does: in a
scratch directory holding the job's transferred (spooled) files only, with
the job's arguments and environment, on a machine without HTCondor, without
an image key and without a metadata service, against the real bootstrap
service (the plugin in Airflow's API server on 127.0.0.1). The pilot brings
HTCondor from the service (a small release the test makes, holding the
condor_master stand-in). Every command the pilot runs goes through a shim that
records its arguments, and the usual power-off commands only record that they
were called. For the EC2 grid type the test plays the EC2 GAHP instead
(RunInstances on moto with the job's spooled user data file) and boots the
VM's wrapper against an IMDSv2 stand-in serving that instance's user data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from airflow_glidein import pilotdb, state, userdata
from airflow_glidein import pilots as P
from tests.helpers import Clock, idle_jobs, jwt_token, run_dag, task_states, write_config, write_queue, xcom
from tests.pilot_helpers import STANDINS, VM, userdata_of
from tests.servers.common import pool_token_connection
from tests.standins import condor
from tests.standins.metadata import MetadataServer, identity_key

pytestmark = pytest.mark.usefixtures("airflow_db")

FACTORY = "grid-factory"
POLICY = {"boot_timeout": 900, "queue_timeout": 7200, "max_lifetime": 7200, "retire_window": 600,
          "idle_timeout": 3600}
POWER = ("poweroff", "shutdown", "halt", "reboot", "systemctl", "init", "telinit")
SYSTEM_BIN = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")


class Grid:
    def __init__(self, monkeypatch) -> None:
        self.pool = condor.Pool("grid-cm.test:9618").install(monkeypatch)
        self.schedd = self.pool.add_schedd("schedd.grid.test")
        token = jwt_token({"iss": "https://ce.grid.test", "sub": "glidein", "scope": "compute.create"})
        monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_GRID_OSG", json.dumps({"conn_type": "glidein_token",
                                                                        "password": token}))
        pool_token_connection(monkeypatch)


@pytest.fixture
def grid(monkeypatch):
    g = Grid(monkeypatch)
    yield g
    g.pool.close()


def condor_release(tmp_path: Path) -> tuple[Path, str]:
    """A small HTCondor "release" as the factory's operator would configure one: the condor_master stand-in at
    condor-25.0.0-test/sbin/condor_master (and an empty bin/), gzipped."""
    path = tmp_path / "condor-25.0.0-test.tar.gz"
    master = f"#!{sys.executable}\n" + (STANDINS / "condor_master.py").read_text()
    with tarfile.open(path, "w:gz") as tar:
        for name in ("condor-25.0.0-test", "condor-25.0.0-test/bin", "condor-25.0.0-test/sbin"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("condor-25.0.0-test/sbin/condor_master")
        info.mode, info.size = 0o755, len(master.encode())
        tar.addfile(info, io.BytesIO(master.encode()))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def grid_config(tmp_path, monkeypatch, server, grid: Grid, entry: dict | None = None, pilots: int = 2,
                credentials: list | None = None, policy: dict | None = None) -> dict:
    release, sha = condor_release(tmp_path)
    e = {"name": "osg-ce", "middleware": "htcondor_g", "cores": 8, "memory_mb": 16000,
         "attrs": {"GLIDEIN_Site": "OSG_CE"}, "trust_domain": "osg", "auth_method": "scitoken",
         "limits": {"max_pilots": 10, "max_idle": 10, "max_per_cycle": 10, "batch_size": 5},
         "policy": {**POLICY, **(policy or {})},
         "options": {"collector": grid.pool.address, "schedd": grid.schedd.name,
                     "grid_resource": "condor ce.grid.test ce.grid.test:9619", "condor_tarball": "default",
                     "credential_dir": str(tmp_path / "creds"), "terminate_settle": 0},
         **(entry or {})}
    cfg = {
        "factory": {"name": FACTORY, "bootstrap_url": f"{server.url}/glidein", "schedule": None,
                    "collector": grid.pool.address, "retry_delay": 0, "verify_timeout": 5, "verify_poll": 1,
                    "condor_tarballs": {"default": {"path": str(release), "sha256": sha}}},
        "entries": [e],
        "frontends": [{"name": "cms", "schedule": None,
                       "demand": {"queue_file": write_queue(tmp_path, idle_jobs(pilots, e["attrs"]["GLIDEIN_Site"],
                                                                                cpus=8))},
                       "match_expr": "stringListMember(glidein.GLIDEIN_Site, job.DESIRED_Sites)",
                       "start_expr": "TARGET.RequestCpus <= MY.Cpus", "entries": [e["name"]],
                       "credentials": ["grid-cms", "cms-pool-token"], "request_ttl": 100000}],
        "credentials": credentials or [
            {"id": "grid-cms", "type": "scitoken", "conn_id": "glidein_grid_osg", "trust_domain": "osg",
             "purpose": "provision"},
            {"id": "cms-pool-token", "type": "idtoken", "conn_id": "glidein_cms_pool_token", "trust_domain": "osg",
             "purpose": "pilot"}],
    }
    write_config(tmp_path, cfg, monkeypatch)
    return cfg


class WorkerNode:
    """A batch worker node: no HTCondor, no image key, no metadata service. Every command the pilot runs goes
    through a shim that records its arguments; the power-off commands only record that they were called."""

    def __init__(self, root: Path) -> None:
        self.root, self.bin, self.scratch = root, root / "bin", root / "scratch"
        self.bin.mkdir(parents=True)
        self.argv_log, self.power_log = root / "argv.log", root / "power.log"
        self.argv_log.touch()
        self.power_log.touch()
        for d in SYSTEM_BIN:
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                shim, real = self.bin / f, os.path.join(d, f)
                if shim.exists() or f.startswith("condor_") or not f.replace("-", "").replace("_", "")\
                        .replace(".", "").replace("+", "").isalnum() or not os.access(real, os.X_OK) \
                        or os.path.isdir(real):
                    continue
                log = self.power_log if f in POWER else self.argv_log
                run = "" if f in POWER else f'exec "{real}" "$@"\n'
                shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "{f} $*" >>"{log}"\n{run}')
                shim.chmod(0o755)
        for f in POWER:  # also where the system has none
            if not (self.bin / f).exists():
                (self.bin / f).write_text(f'#!/bin/sh\nprintf "%s\\n" "{f} $*" >>"{self.power_log}"\n')
                (self.bin / f).chmod(0o755)

    def run(self, sd: condor.ScheddState, job_id: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The job's executable in its scratch directory, with its transferred files, arguments and environment."""
        argv, job_env = sd.sandbox(job_id, self.scratch)
        env = {"PATH": str(self.bin), "HOME": str(self.root), "_CONDOR_SCRATCH_DIR": str(self.scratch),
               "GLIDEIN_CONNECT_TIMEOUT": "2", **job_env}
        return subprocess.run(argv, cwd=self.scratch, env=env, capture_output=True, text=True, timeout=timeout)

    @property
    def commands(self) -> str:
        return self.argv_log.read_text()

    @property
    def powered(self) -> str:
        return self.power_log.read_text()


def ok(run):
    assert str(run.state) == "success", task_states(run)
    return run


def table() -> dict[str, dict]:
    return pilotdb.load_pilots(state.store())


def register(pool: condor.Pool, params: dict, since: float) -> None:
    """The startd the pilot's condor_master would start, as the collector shows it (its configuration, as
    HTCondor read it: StandinParams.json)."""
    pid = params["GLIDEIN_PILOT_ID"].strip('"')
    pool.add_startd({"Name": f"slot1@glidein-{pid}", "GLIDEIN_PILOT_ID": pid, "GLIDEIN_Factory": FACTORY,
                     "GLIDEIN_Entry_Name": params["GLIDEIN_Entry_Name"].strip('"'), "State": "Unclaimed",
                     "Activity": "Idle", "EnteredCurrentState": int(since)})


def spooled_token(sd: condor.ScheddState, job_id: str) -> str:
    (ad,) = sd._match(job_id)
    return userdata.parse(Path(ad["Iwd"], "glidein.envelope").read_text())["token"]


def xcoms_text(*runs) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return " ".join(str(XComModel.deserialize_value(x)) for run in runs for x in session.scalars(
            XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, key=None)).all())


def test_grid_pilots_boot_at_a_site_join_the_pool_send_their_logs_and_are_reaped(
        grid, bootstrap_server, tmp_path, monkeypatch, caplog, capfd):
    clock = Clock(monkeypatch)
    grid_config(tmp_path, monkeypatch, bootstrap_server, grid)
    sd = grid.schedd
    runs = [ok(run_dag("glidein_frontend_cms")), ok(run_dag("glidein_factory"))]
    assert [(s["count"], s["spool"]) for s in sd.submits] == [(2, True)]
    assert sorted(f"{c}.{p}" for c, p in sd.jobs) == ["1.0", "1.1"]
    token = spooled_token(sd, "1.0")
    assert all(token not in str(ad) for ad in sd.jobs.values())  # no job attribute holds it
    assert all(token not in str(s["description"]) for s in sd.submits)
    assert {k: r["state"] for k, r in table().items()} == {"osg-ce/1.0": P.REQUESTED, "osg-ce/1.1": P.REQUESTED}

    # The site starts both jobs; each runs the job's executable on a worker node.
    sd.start(["1.0", "1.1"])
    nodes = {}
    for jid in ("1.0", "1.1"):
        nodes[jid] = node = WorkerNode(tmp_path / f"node-{jid}")
        proc = node.run(sd, jid)
        assert proc.returncode == 0, proc.stderr
        for text in (proc.stdout, proc.stderr, node.commands):
            assert token not in text
    params = {}
    for jid, node in nodes.items():
        logs = bootstrap_server.logs("osg-ce", jid)  # its logs came home, under its own id
        assert {"glidein.log", "condor_master.stdout", "MasterLog", "StartLog", "StandinParams.json"} <= set(logs)
        assert all(token not in text for text in logs.values())
        params[jid] = p = json.loads(logs["StandinParams.json"])  # what HTCondor read from the written config
        assert p["GLIDEIN_PILOT_ID"] == f'"osg-ce/{jid}"' and p["GLIDEIN_Instance_ID"] == f'"{jid}"'
        assert p["GLIDEIN_Site"] == '"OSG_CE"' and p["COLLECTOR_HOST"] == grid.pool.address
        # HTCondor came from the bootstrap service, into the job's scratch directory, as did all the rest
        scratch = str(node.scratch)
        assert p["RELEASE_DIR"].startswith(scratch) and p["SBIN"] == p["RELEASE_DIR"] + "/sbin"
        assert p["LOCAL_DIR"].startswith(scratch) and p["_token_files"] == ["pilot.idtoken"]
        assert "HTCondor release default (" in logs["glidein.log"]
        assert node.powered == "" and "not powering anything off" in (node.scratch / "glidein" / "glidein.log").read_text()
        assert "169.254" not in node.commands  # no metadata service was asked
        assert f"condor_master stand-in running pilot \"osg-ce/{jid}\"" in logs["condor_master.stdout"]

    # The startds join the pool: the factory's inventory finds them under the pilots' own ids.
    for p in params.values():
        register(grid.pool, p, clock.now())
    runs.append(ok(run_dag("glidein_factory")))
    rows = table()
    assert {k: r["state"] for k, r in rows.items()} == {"osg-ce/1.0": P.IDLE, "osg-ce/1.1": P.IDLE}
    assert rows["osg-ce/1.0"]["started"] == sd.jobs[(1, 0)]["JobCurrentStartDate"]
    assert rows["osg-ce/1.0"]["memory"]["first_registered"] is not None

    # Past their lifetime (from their start) the factory reaps them: condor_rm, and the jobs leave the queue.
    clock.offset = POLICY["max_lifetime"] + 60
    runs.append(ok(run_dag("glidein_factory")))
    assert {a["id"]: a["action"] for a in xcom(runs[-1], "plan_cycle", key="actions")} == {
        "1.0": "terminate", "1.1": "terminate"}
    assert (1, 0) not in sd.jobs and (1, 1) not in sd.jobs and ("Remove", ["1.0", "1.1"]) in sd.actions
    assert not any(a == "RemoveX" for a, _ in sd.actions)  # gone on condor_rm: nothing to force
    assert sorted(f"{c}.{p}" for c, p in sd.jobs) == ["2.0", "2.1"]  # the frontend's level still stands

    # The bootstrap token in no log of the service or the tasks, and in no XCom.
    out, err = capfd.readouterr()
    xcoms = xcoms_text(*runs)
    assert "osg-ce" in xcoms and "Pilot 1.0 of launch" in caplog.text + out + err  # what was searched is there
    for text in (caplog.text, out, err, xcoms):
        assert token not in text


def test_ec2_gahp_pilots_claim_their_instance_id_and_join_as_their_grid_job(
        grid, ec2, bootstrap_server, tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    monkeypatch.setenv("AIRFLOW__GLIDEIN__EC2_IDENTITY_CERT", identity_key()[1])  # pilots prove their instance id
    grid_config(tmp_path, monkeypatch, bootstrap_server, grid, entry={
        "name": "osg-ec2", "auth_method": "key_pair", "trust_domain": "aws", "image": "ami-1e749f67",
        "flavor": "c5.xlarge", "attrs": {"GLIDEIN_Site": "OSG_EC2"},
        "options": {"collector": grid.pool.address, "schedd": grid.schedd.name, "grid_resource": f"ec2 {ec2.url}",
                    "credential_dir": str(tmp_path / "creds"), "terminate_settle": 0}},
        credentials=[{"id": "grid-cms", "type": "ec2_key_pair", "conn_id": "glidein_aws_demo", "trust_domain": "aws",
                      "purpose": "provision"},
                     {"id": "cms-pool-token", "type": "idtoken", "conn_id": "glidein_cms_pool_token",
                      "trust_domain": "aws", "purpose": "pilot"}])
    sd = grid.schedd
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    assert sorted(f"{c}.{p}" for c, p in sd.jobs) == ["1.0", "1.1"]
    token = spooled_token(sd, "1.0")
    assert all(token not in str(ad) and "EC2UserData" not in ad for ad in sd.jobs.values())
    made = sd.ec2_gahp(["1.0", "1.1"], ec2.client())  # the GAHP starts the VMs: GridJobId "ec2 URL TOKEN i-..."

    def boot(jid: str) -> VM:
        iid = made[jid]
        raw = userdata_of(ec2, iid)
        assert raw == Path(sd.jobs[(1, int(jid[-1]))]["Iwd"], "glidein.envelope").read_bytes()
        with MetadataServer("imdsv2", raw, iid) as md:  # the image has the wrapper and HTCondor baked in
            vm = VM(tmp_path / f"vm-{jid}", bootstrap_server, {"GLIDEIN_IMDS_URL": md.url})
            proc = vm.boot()
        assert proc.returncode == 0, proc.stderr
        conf = vm.condor_config()  # the VM claimed its instance id; its startd names its grid job
        assert f'GLIDEIN_PILOT_ID = "osg-ec2/{jid}"' in conf and f'GLIDEIN_Instance_ID = "{iid}"' in conf
        assert "the exchange will carry EC2's signed instance identity document" in \
            bootstrap_server.logs("osg-ec2", jid)["glidein.log"]  # logs home under the pilot's own id
        return vm

    boot("1.0")  # before any inventory saw its GridJobId: the service finds the alias in the schedd's listing
    ok(run_dag("glidein_factory"))
    assert {k: (r["alias"], r["started"] is not None) for k, r in table().items()} == {
        "osg-ec2/1.0": (made["1.0"], True), "osg-ec2/1.1": (made["1.1"], True)}
    boot("1.1")  # now the factory's record holds the alias: no listing needed
    for jid in ("1.0", "1.1"):
        register(grid.pool, json.loads(bootstrap_server.logs("osg-ec2", jid)["StandinParams.json"]), clock.now())
    ok(run_dag("glidein_factory"))
    assert {k: r["state"] for k, r in table().items()} == {"osg-ec2/1.0": P.IDLE, "osg-ec2/1.1": P.IDLE}

    clock.offset = POLICY["max_lifetime"] + 60
    ok(run_dag("glidein_factory"))
    assert (1, 0) not in sd.jobs and (1, 1) not in sd.jobs and ("Remove", ["1.0", "1.1"]) in sd.actions
    assert {i["InstanceId"] for i in ec2.instances()}.isdisjoint(made.values())  # the gridmanager ended the VMs


def test_a_job_queued_longer_than_its_boot_timeout_still_boots(grid, bootstrap_server, tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    grid.schedd.clock = clock.now  # the schedd's QDate on the same clock
    grid_config(tmp_path, monkeypatch, bootstrap_server, grid, pilots=1)
    sd = grid.schedd
    queued = POLICY["boot_timeout"] + 600  # longer than the boot timeout, well within the queue timeout
    clock.offset = -queued  # submitted (and its token issued) that long ago
    ok(run_dag("glidein_frontend_cms"))
    ok(run_dag("glidein_factory"))
    clock.offset = 0
    run = ok(run_dag("glidein_factory"))
    assert xcom(run, "plan_cycle", key="actions") == []  # queued is not booting: nothing to reap
    assert table()["osg-ce/1.0"]["state"] == P.BOOTING and sd.jobs[(1, 0)]["JobStatus"] == condor.IDLE

    sd.start("1.0")
    node = WorkerNode(tmp_path / "node")
    before = time.time()
    proc = node.run(sd, "1.0")
    assert proc.returncode == 0, proc.stderr  # its token, issued 1500 s ago, still exchanged
    params = json.loads(bootstrap_server.logs("osg-ce", "1.0")["StandinParams.json"])
    # its lifetime runs from its start at the site, not from its submission
    assert int(params["GLIDEIN_ToRetire"]) >= before + POLICY["max_lifetime"] - 1


def test_the_bootstrap_path_never_acts_on_jobs_only_the_inventory_does(grid, bootstrap_server, tmp_path,
                                                                       monkeypatch):
    from airflow_glidein.bootstrap.launches import userdata_for
    from airflow_glidein.config import get_config
    from airflow_glidein.hooks import LaunchSpec, pilot_hook
    from airflow_glidein.sensors.registered import registration

    grid_config(tmp_path, monkeypatch, bootstrap_server, grid)
    config = get_config()
    entry = config.entry("osg-ce")
    batch = {"launch_id": "t1.cms.osg-ce.0", "frontend": "cms", "count": 2, "pilot": "cms-pool-token",
             "start_expr": "true", "policy": config.policy_for(entry, "cms").model_dump()}
    text = userdata_for(config, entry, batch, "glidein_grid_osg")
    # not recorded in the pilot table: the service must ask the schedd
    pilot_hook(entry, FACTORY, "glidein_grid_osg").launch(LaunchSpec(
        launch_id=batch["launch_id"], frontend="cms", count=2, image="", userdata=text))
    sd = grid.schedd
    sd.set_status("1.0", condor.HELD, "Error from ce.grid.test: job proxy expired")
    sd.set_status("1.1", condor.HELD, "Error from ce.grid.test: job proxy expired")
    sd.actions.clear()
    bearer = {"Authorization": f"Bearer {userdata.parse(text)['token']}"}
    url = f"{bootstrap_server.url}/glidein/bootstrap"
    assert httpx.post(f"{url}/exchange", params={"instance_id": "1.0"}, headers=bearer).status_code == 200
    assert httpx.post(f"{url}/exchange", params={"instance_id": "7.3"}, headers=bearer).status_code == 403
    assert httpx.put(f"{url}/logs/glidein.log", params={"instance_id": "1.1"}, headers=bearer,
                     content=b"a wrapper that failed early").status_code == 200
    registration(None, "launch", batch["launch_id"])  # the registration sensor lists the entry too
    assert sd.actions == []  # no release, no remove, no edit: whoever lists changes nothing
    assert [sd.jobs[(1, p)]["JobStatus"] for p in (0, 1)] == [condor.HELD, condor.HELD]

    ok(run_dag("glidein_factory"))  # the factory's inventory alone tends held pilots
    assert [a for a, _ in sd.actions] == ["edit", "Release"]
    assert [sd.jobs[(1, p)]["JobStatus"] for p in (0, 1)] == [condor.IDLE, condor.IDLE]


def test_the_htcondor_release_goes_only_to_pilots_and_only_as_configured(grid, bootstrap_server, tmp_path,
                                                                         monkeypatch, caplog):
    from airflow_glidein.bootstrap.launches import userdata_for
    from airflow_glidein.config import get_config

    cfg = grid_config(tmp_path, monkeypatch, bootstrap_server, grid)
    config = get_config()
    entry = config.entry("osg-ce")
    text = userdata_for(config, entry, {"launch_id": "t2.cms.osg-ce.0", "frontend": "cms", "count": 1,
                                        "pilot": "cms-pool-token", "start_expr": "true",
                                        "policy": config.policy_for(entry, "cms").model_dump()}, "glidein_grid_osg")
    envelope = userdata.parse(text)
    release = Path(cfg["factory"]["condor_tarballs"]["default"]["path"])
    assert (envelope["condor_tarball"], envelope["condor_tarball_sha256"]) == \
        ("default", hashlib.sha256(release.read_bytes()).hexdigest())  # signed: the pilot checks what it gets
    state.store()
    pilotdb.record_created(state.store(), [{"id": "1.0", "entry": "osg-ce", "launch": "t2.cms.osg-ce.0",
                                            "launched": time.time(), "state": P.REQUESTED, "memory": {},
                                            "updated": time.time()}])
    url = f"{bootstrap_server.url}/glidein/bootstrap"
    reply = httpx.post(f"{url}/exchange", params={"instance_id": "1.0"},
                       headers={"Authorization": f"Bearer {envelope['token']}"})
    upload = dict(line.split("=", 1) for line in reply.text.splitlines())["upload_token"]
    get = lambda name="default", token=upload: httpx.get(  # noqa: E731
        f"{url}/condor/{name}.tar.gz", headers={"Authorization": f"Bearer {token}"} if token else {})
    assert get(token=None).status_code == 401
    assert get(token=envelope["token"]).status_code == 403  # a bootstrap token (UserData, a job file) is not enough
    assert get(name="el7").status_code == 404
    served = get()
    assert served.status_code == 200 and served.content == release.read_bytes()
    release.write_bytes(release.read_bytes() + b"tampered")  # the file changed under the service
    refused = get()
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert "the file has SHA-256" in caplog.text and "it is not served" in caplog.text
