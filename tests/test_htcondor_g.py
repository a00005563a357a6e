"""HTCondor-G pilots: real htcondor2.Submit descriptions against the schedd stand-in (tests/standins/condor.py).

No schedd can run here; the stand-in stores real ClassAds, evaluates our
constraints with classad2, records the real Submit objects, spools the jobs'
files, and tests move grid jobs along (started at the site, held, removed) as
the remote side would. The pilots' whole path (a site running the job,
the bootstrap service, the DAGs) is in test_htcondor_g_pilots.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import htcondor2
import pytest

from airflow_glidein import pilots as P
from airflow_glidein import userdata
from airflow_glidein.config import Entry
from airflow_glidein.hooks import LaunchSpec, pilot_hook
from airflow_glidein.hooks.htcondor_g import GRID_PILOT, ec2_ids
from tests.servers.common import signed_envelope

condor = pytest.importorskip("tests.standins.condor")

FACTORY = "grid-factory"
PROXY = "-----BEGIN CERTIFICATE-----\nMIIproxy-not-a-real-one\n-----END CERTIFICATE-----\n"
TOKEN = "bootstrap-token-of-the-launch-not-for-job-ads"


@pytest.fixture
def schedd(monkeypatch, tmp_path):
    pool = condor.Pool("glidein-cm.test:9618")
    sd = pool.add_schedd("schedd.glidein.test")
    pool.install(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_GRID_TEST", f'{{"conn_type": "generic", "password": {PROXY!r}}}'
                       .replace("'", '"').replace("\n", "\\n"))
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_EC2_GAHP", '{"conn_type": "aws", "login": "AKIAGAHPTEST", '
                                                        '"password": "gahp-secret-key"}')
    yield sd
    pool.close()


def entry(tmp_path, grid_resource: str = "condor ce.example.org ce.example.org:9619", **options) -> Entry:
    opts = {"collector": "glidein-cm.test:9618", "schedd": "schedd.glidein.test", "grid_resource": grid_resource,
            "credential_dir": str(tmp_path / "creds"), "terminate_settle": 0, **options}
    image = {"image": "ami-1e749f67", "flavor": "c5.xlarge"} if grid_resource.startswith("ec2") else {}
    return Entry(name="osg-ce", middleware="htcondor_g", cores=8, memory_mb=16000, trust_domain="osg",
                 auth_method="grid_proxy", options=opts, **image)


def spec(count: int = 3, launch: str = "r1.cms.osg-ce.0", image: str | None = None, **fields) -> LaunchSpec:
    env = signed_envelope("htcondor_g", {"factory": FACTORY, "entry": "osg-ce", "launch_id": launch, "token": TOKEN,
                                         "token_expires": int(time.time()) + 3600, "boot_timeout": 900,
                                         "max_lifetime": 7200, "retire_window": 600, **fields})
    return LaunchSpec(launch_id=launch, frontend="cms", count=count, image=image or "", userdata=env, request="c1")


def no_token_in_any_ad(sd) -> None:
    for ad in sd.jobs.values():
        assert TOKEN not in str(ad)
    for sub in sd.submits:
        assert TOKEN not in str(sub["description"])


def test_grid_pilots_are_spooled_jobs_of_the_shipped_pilot_with_their_id_as_only_argument(schedd, tmp_path):
    s = spec(count=3)
    ids = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test").launch(s)["created"]
    assert ids == ["1.0", "1.1", "1.2"] and len(schedd.submits) == 1  # one cluster, one call
    sub = schedd.submits[0]["description"]
    assert isinstance(sub, htcondor2.Submit) and schedd.submits[0]["count"] == 3 and schedd.submits[0]["spool"]
    assert sub["universe"] == "grid" and sub["grid_resource"] == "condor ce.example.org ce.example.org:9619"
    # the pilot the package ships, transferred; its one argument is its id on this schedd
    assert sub["executable"] == str(GRID_PILOT) and os.access(GRID_PILOT, os.X_OK)
    assert sub["transfer_executable"] == "true" and sub["arguments"] == "$(Cluster).$(Process)"
    assert [schedd.jobs[(1, p)]["Args"] for p in range(3)] == ["1.0", "1.1", "1.2"]
    inputs = [os.path.basename(f) for f in sub["transfer_input_files"].split(",")]
    assert sorted(inputs) == ["ed25519_verify.py", "factory.pub", "glidein-lib.sh", "glidein-wrapper.sh",
                              "glidein.envelope"]
    assert sub["request_cpus"] == "8" and sub["MY.GlideinLaunch"] == '"r1.cms.osg-ce.0"'
    assert "environment" not in sub and "ec2_user_data" not in sub
    # spooled: the schedd holds the files; the worker's staged copies are gone
    for p in range(3):
        job = schedd.jobs[(1, p)]
        assert job["JobStatus"] == condor.IDLE and job["JobUniverse"] == 9
        spooled = os.path.join(job["Iwd"], "glidein.envelope")
        assert open(spooled).read() == s.userdata
        pub = userdata.load_public_pem(open(os.path.join(job["Iwd"], "factory.pub")).read())
        assert userdata.parse(s.userdata, pub)["launch_id"] == "r1.cms.osg-ce.0"  # the key that signed it
    assert not any(os.path.exists(f) for f in sub["transfer_input_files"].split(",") if "glidein-grid-" in f)
    proxy = sub["x509userproxy"]
    assert open(proxy).read() == PROXY and stat.S_IMODE(os.stat(proxy).st_mode) == 0o600
    assert "MIIproxy" not in str(sub)
    no_token_in_any_ad(schedd)


def test_ec2_pilots_read_their_user_data_from_a_spooled_file_never_a_job_attribute(schedd, tmp_path):
    e = entry(tmp_path, "ec2 https://ec2.us-east-1.amazonaws.com", ec2_keypair="ops")
    s = spec(count=2, image="ami-1e749f67")
    pilot_hook(e, FACTORY, "glidein_ec2_gahp").launch(s)
    sub = schedd.submits[0]["description"]
    assert sub["grid_resource"] == "ec2 https://ec2.us-east-1.amazonaws.com" and schedd.submits[0]["spool"]
    assert (sub["ec2_ami_id"], sub["ec2_instance_type"], sub["ec2_keypair"]) == ("ami-1e749f67", "c5.xlarge", "ops")
    assert sub["ec2_user_data_file"] == "glidein.envelope" and "ec2_user_data" not in sub
    for job in schedd.jobs.values():
        assert "EC2UserData" not in job
        assert open(os.path.join(job["Iwd"], job["EC2UserDataFile"])).read() == s.userdata
    assert open(sub["ec2_access_key_id"]).read() == "AKIAGAHPTEST"
    assert open(sub["ec2_secret_access_key"]).read() == "gahp-secret-key"
    assert stat.S_IMODE(os.stat(sub["ec2_secret_access_key"]).st_mode) == 0o600
    assert "gahp-secret-key" not in str(sub) and "arguments" not in sub
    no_token_in_any_ad(schedd)


def test_a_failed_spool_removes_the_cluster_it_made(schedd, tmp_path, monkeypatch):
    def lost(result):
        raise htcondor2.HTCondorException("Failed to spool: connection reset")

    monkeypatch.setattr(schedd, "spool", lost)
    with pytest.raises(htcondor2.HTCondorException, match="spool"):
        pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test").launch(spec(count=2))
    assert schedd.jobs == {}  # held for spooling, never given their files: removed, nothing behind them
    assert schedd.actions == [("Remove", ["1.0", "1.1"])]


def test_the_listing_says_when_the_site_started_a_job_and_an_ec2_jobs_instance_id(schedd, tmp_path):
    hook = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test")
    hook.launch(spec(count=2))
    schedd.start("1.1")
    listed = {i.id: i for i in hook.list_pilots()}
    assert listed["1.0"].started is None and listed["1.0"].state == P.P_PENDING  # queued at the site
    assert listed["1.1"].started == schedd.jobs[(1, 1)]["JobCurrentStartDate"] and listed["1.1"].state == P.P_RUNNING
    assert listed["1.1"].aliases == ()  # a CE's own job id is no id the pilot claims
    grid = "ec2 https://ec2.us-east-1.amazonaws.com glidein-tok-1 i-0abc123def4567890"
    assert ec2_ids(grid) == ("glidein-tok-1", "i-0abc123def4567890")
    assert ec2_ids("ec2 https://ec2.us-east-1.amazonaws.com glidein-tok-1") == ("glidein-tok-1", None)
    schedd.jobs[(1, 0)]["GridJobId"] = grid
    assert {i.id: i for i in hook.list_pilots()}["1.0"].aliases == ("i-0abc123def4567890",)


def test_listing_never_acts_held_pilots_are_the_inventorys_to_release_then_remove(schedd, tmp_path, caplog):
    hook = pilot_hook(entry(tmp_path, max_releases=2), FACTORY, "glidein_grid_test")
    ids = hook.launch(spec(count=2))["created"]
    reason = "Error from ce.example.org: globus_gram_protocol_error_10"
    schedd.actions.clear()
    schedd.set_status("1.0", condor.HELD, reason)
    # whoever lists (a sensor, the bootstrap service for a token holder) changes nothing
    for _ in range(3):
        assert {i.id: i.state for i in hook.list_pilots()}["1.0"] == P.P_ERROR
        assert [i.id for i in hook.list_launch("r1.cms.osg-ce.0")] == ids
    assert schedd.actions == [] and schedd.jobs[(1, 0)]["JobStatus"] == condor.HELD
    for n in (1, 2):
        schedd.set_status("1.0", condor.HELD, reason)
        listed = {i.id: i for i in hook.sanitize(hook.list_pilots())}
        assert listed["1.0"].state == P.P_PENDING and f"({n} of 2)" in listed["1.0"].detail
        assert schedd.jobs[(1, 0)]["JobStatus"] == condor.IDLE
    schedd.set_status("1.0", condor.HELD, reason)
    listed = {i.id: i for i in hook.sanitize(hook.list_pilots())}
    assert listed["1.0"].state == P.P_TERMINATING and reason in listed["1.0"].detail
    assert "held again after 2 releases, removed" in caplog.text and reason in caplog.text
    assert (1, 0) not in schedd.jobs and (1, 1) in schedd.jobs
    assert [i.id for i in hook.list_pilots()] == ids[1:]


def test_a_job_held_for_spooling_past_the_listing_grace_is_removed_not_released(schedd, tmp_path):
    hook = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test")
    result = schedd.submit(hook.description(spec(count=1), hook.tags(spec(count=1)), tmp_path), count=1, spool=True)
    assert result.cluster() == 1 and schedd.jobs[(1, 0)]["HoldReasonCode"] == condor.SPOOLING
    listed = hook.sanitize(hook.list_pilots())
    assert [(i.state, i.detail) for i in listed] == [(P.P_PENDING, "waiting for its input files to be spooled")]
    assert schedd.actions == []  # within the grace: the submitting task may still spool
    schedd.jobs[(1, 0)]["QDate"] = int(time.time()) - hook.entry.listing_grace - 10
    listed = hook.sanitize(hook.list_pilots())
    assert listed[0].state == P.P_TERMINATING and schedd.jobs == {}
    assert schedd.actions == [("Remove", ["1.0"])]


def test_forcex_only_where_nothing_can_still_run_behind_the_job(schedd, tmp_path, caplog):
    schedd.keep_removed = True  # condor_rm leaves X until the remote side confirms; it never does here
    hook = pilot_hook(entry(tmp_path), FACTORY, "glidein_grid_test")
    hook.launch(spec(count=4))
    schedd.start(["1.1", "1.2"])  # at the CE now; 1.0 and 1.3 never reached it
    schedd.jobs[(1, 2)]["JobCurrentStartDate"] -= 900 + 7200 + 600 + 901  # its pilot's lifetime is over
    schedd.jobs[(1, 3)]["GridJobId"] = "condor ce.example.org ce.example.org:9619 7001.3"  # queued there ...
    schedd.jobs[(1, 3)]["GlideinTokenExpires"] = int(time.time()) - 60  # ... past its token: it cannot join
    report = hook.terminate_verified(["1.0", "1.1", "1.2", "1.3"])
    assert sorted(report.gone) == ["1.0", "1.2", "1.3"]
    assert list(report.stuck) == ["1.1"] and "may still run it; not forced before its pilot's lifetime is over" \
        in report.stuck["1.1"]
    assert set(schedd.jobs) == {(1, 1)} and schedd.jobs[(1, 1)]["JobStatus"] == condor.REMOVED  # still tracked
    assert ("RemoveX", ["1.0", "1.2", "1.3"]) in schedd.actions
    assert not any(a == "RemoveX" and "1.1" in ids for a, ids in schedd.actions)
    assert "Pilot 1.1 at osg-ce is not forced out of the queue" in caplog.text


def test_a_bad_grid_resource_is_a_clear_error(schedd, tmp_path):
    """The entry's options schema (airflow_glidein.middlewares) refuses it when the configuration loads."""
    with pytest.raises(ValueError, match=r"options.grid_resource\n  Value error, must start with ec2, condor, arc or batch"):
        pilot_hook(entry(tmp_path, "gt2 gatekeeper.example.org"), FACTORY, "glidein_grid_test").launch(spec())
    assert schedd.submits == []


def test_an_ec2_jobs_instance_is_terminated_through_ec2_before_the_job_is_forced(schedd, ec2, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_EC2_GAHP", ec2.connection_json())  # the aws connection, at moto
    hook = pilot_hook(entry(tmp_path, f"ec2 {ec2.url}"), FACTORY, "glidein_ec2_gahp")
    hook.launch(spec(count=2, image="ami-1e749f67"))
    iid = schedd.ec2_gahp("1.0", ec2.client())["1.0"]  # 1.1 never got an instance
    schedd.keep_removed = True  # the gridmanager cannot end them: condor_rm leaves both in X
    report = hook.terminate_verified(["1.0", "1.1"])
    assert sorted(report.gone) == ["1.0", "1.1"] and report.stuck == {} and schedd.jobs == {}
    assert ("RemoveX", ["1.0", "1.1"]) in schedd.actions
    state = ec2.client().describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"  # through the EC2 API, before the job left the queue


def test_an_ec2_job_is_never_forced_while_its_instance_may_still_run(schedd, ec2, tmp_path, monkeypatch):
    from tests.pilot_helpers import closed_port_url

    monkeypatch.setenv("AIRFLOW_CONN_GLIDEIN_EC2_GAHP", ec2.connection_json())
    hook = pilot_hook(entry(tmp_path, f"ec2 {closed_port_url()}"), FACTORY, "glidein_ec2_gahp")  # EC2 unreachable
    hook.launch(spec(count=1, image="ami-1e749f67"))
    iid = schedd.ec2_gahp("1.0", ec2.client())["1.0"]
    schedd.keep_removed = True
    report = hook.terminate_verified(["1.0"])
    assert report.gone == [] and "its EC2 instance cannot be looked up now" in report.stuck["1.0"]
    assert schedd.jobs[(1, 0)]["JobStatus"] == condor.REMOVED  # still in the queue: still tracked
    assert not any(a == "RemoveX" for a, _ in schedd.actions)
    assert ec2.instances()[0]["InstanceId"] == iid  # and still running: it will be terminated again


# -- queued is not booting; the collector join accepts an alias; configuration --------------------------------

def test_a_queued_pilot_is_booting_until_its_queue_timeout_then_boots_within_its_boot_timeout():
    from airflow_glidein import lifecycle as L

    def state(started, age, registered=False):
        now = 100_000.0
        obs = L.Observation(P.P_PENDING if started is None else P.P_RUNNING, now - age, known=True,
                            startd={"State": "Unclaimed"} if registered else None,
                            started=None if started is None else now - started)
        return L.transition(L.Memory(), obs, now, boot_timeout=900, queue_timeout=7200)[0]

    assert state(None, 5000) == P.BOOTING  # queued longer than the boot timeout: not a boot failure
    assert state(None, 7300) == P.BOOT_FAILED  # never started within the queue timeout
    assert state(600, 7300) == P.BOOTING  # started 600 s ago, after a long queue: still booting
    assert state(1000, 1100) == P.BOOT_FAILED  # started 1000 s ago and not registered
    assert state(1000, 1100, registered=True) == P.IDLE
    vm = L.Observation(P.P_RUNNING, 100_000.0 - 1000, known=True)  # no queue: a VM boots from its launch
    assert L.transition(L.Memory(), vm, 100_000.0, boot_timeout=900)[0] == P.BOOT_FAILED


def test_the_pilots_lifetime_runs_from_its_start_and_a_queued_orphan_goes_at_once(tmp_path):
    from airflow_glidein import lifecycle as L
    from airflow_glidein.config import parse_config

    cfg = parse_config({"factory": {"name": FACTORY, "bootstrap_url": "http://127.0.0.1:8080/glidein"},
                        "entries": [entry(tmp_path).model_dump() | {"policy": {"max_lifetime": 7200}}]})
    now = 1_000_000.0
    row = {"entry": "osg-ce", "frontend": "cms", "launched": now - 9000, "memory": {}, "startd": None}
    idle = {**row, "id": "1.0", "state": P.IDLE, "started": now - 3000,
            "startd": {"State": "Unclaimed", "EnteredCurrentState": now - 100}}
    old = {**idle, "id": "1.1", "started": now - 7300}
    orphan = {**row, "id": "1.2", "frontend": "gone", "state": P.ORPHAN, "launched": now - 10, "started": None}
    acts = {a.id: a.reason for a in L.reap(cfg, [idle, old, orphan], {("osg-ce", "cms"): 5}, now)}
    assert acts == {"1.1": "past max_lifetime (7300 s > 7200 s)",
                    "1.2": "orphan (unknown frontend or entry), still queued at the site"}


def test_the_collector_join_accepts_an_ec2_gahp_pilots_instance_id():
    from airflow_glidein.operators.lifecycle import joined

    inst = P.ProviderInstance("1.0", P.P_RUNNING, 0.0, aliases=("i-0abc123",))
    by_alias = {"osg-ec2/i-0abc123": {"State": "Unclaimed"}}
    assert joined(by_alias, "osg-ec2", inst) == {"State": "Unclaimed"}
    assert joined({"osg-ec2/1.0": {"State": "Claimed"}}, "osg-ec2", inst) == {"State": "Claimed"}
    assert joined({"other-entry/i-0abc123": {}}, "osg-ec2", inst) is None  # qualified by entry, as every id
    assert joined(None, "osg-ec2", inst) is None


def test_a_condor_tarball_must_be_one_the_factory_serves(tmp_path):
    from airflow_glidein.config import ConfigError, load_config
    from tests.helpers import write_config

    data = {"factory": {"name": FACTORY, "bootstrap_url": "http://127.0.0.1:8080/glidein",
                        "condor_tarballs": {"el9": {"path": "/srv/condor-el9.tar.gz", "sha256": "ab" * 32}}},
            "entries": [entry(tmp_path, condor_tarball="el8").model_dump()]}
    with pytest.raises(ConfigError, match="names condor_tarball 'el8', which factory.condor_tarballs does not hold"):
        load_config(write_config(tmp_path, data))
    data["factory"]["condor_tarballs"]["el9"]["sha256"] = "not-a-digest"
    with pytest.raises(ConfigError, match=r"factory.condor_tarballs.el9.sha256"):
        load_config(write_config(tmp_path, data))


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_a_token_in_a_request_header_never_shows_in_a_process_argument(client, bootstrap_server, tmp_path):
    """The pilot library's http() with either client: the server gets the header, no command line shows it."""
    from tests.test_htcondor_g_pilots import WorkerNode

    node = WorkerNode(tmp_path / "node")
    (tmp_path / "token").write_text(TOKEN)
    script = tmp_path / "ask.sh"
    script.write_text(f'. "{GRID_PILOT.parent / "glidein-lib.sh"}"\nGLIDEIN_WORKDIR={tmp_path}\n'
                      f'code=$(http GET "{bootstrap_server.url}/glidein/bootstrap/condor/default.tar.gz" '
                      f'"{tmp_path}/out" "Authorization: Bearer $(cat "{tmp_path}/token")")\n'
                      f'echo "$code"; cat "{tmp_path}/out"\n')
    proc = subprocess.run(["sh", str(script)], env={"PATH": str(node.bin), "GLIDEIN_HTTP_CLIENT": client,
                                                    "GLIDEIN_HTTP_RETRIES": "0"},
                          capture_output=True, text=True, timeout=60)
    # the service read the token (and refused it: no such pilot), so the header was sent
    assert proc.stdout.startswith("403") and "unknown bootstrap token" in proc.stdout, proc.stderr
    assert f"{client} " in node.commands and TOKEN not in node.commands
    assert not list(tmp_path.glob("out.*"))  # the header file is gone
